"""The generic quantization transform (``quant/transform.py``): on the shared featurizer it is
the policy the project hand-walked before (``support.references.resnet_policy_reference``):
the same module tree, the same numbers, the same gradients, bit for bit; its inverse gives the
float model back; linears where the policy says so; device and dtype kept."""

import numpy as np
import pytest
import torch
from support.helpers import tiny_hparams
from support.references import lsq_forward, resnet_policy_reference
from torch import nn

from domainbed_gaqat.plugin.featurizer import Featurizer, quant_policy
from domainbed_gaqat.quant.config import QuantConfig
from domainbed_gaqat.quant.modules import (
    QuantConv2d,
    QuantLinear,
    Scale,
    quantization_disabled,
    quantizers,
)
from domainbed_gaqat.quant.transform import QuantPolicy, dequantize, quantize

POLICIES = {  # name -> (algorithm, overrides): the W/A policy, QT-DoG's, its release's stem
    "lsq_w3a3": ("LSQ", {"w_bits": 3, "a_bits": 3}),
    "qtdog": ("QTDoG", {"quant_start": 0}),
    "qtdog_release_stem": ("QTDoG", {"quant_start": 0, "qtdog_release": True}),
}


def _tree(module: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in module.named_modules()]


def _forward_backward(model: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(grad)
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy_name,channels,resnet18", [
    *[(name, 3, True) for name in POLICIES],
    ("lsq_w3a3", 4, True),  # a stem of four input channels (ARM's image and context)
    # ResNet-50's bottlenecks: 53 scales calibrated twice, 86 s in `make test` on 2 cores
    # (measured with --durations): `make coverage` runs it
    pytest.param("lsq_w3a3", 3, False, marks=pytest.mark.coverage)])
def test_transform_on_the_shared_featurizer_is_the_former_policy(policy_name, channels,
                                                                 resnet18):
    algorithm, overrides = POLICIES[policy_name]
    hparams = tiny_hparams(algorithm, resnet18=resnet18, **overrides)
    policy = quant_policy(hparams)
    torch.manual_seed(0)
    new = Featurizer((channels, 32, 32), hparams, policy)  # quantize(network, policy)
    torch.manual_seed(0)
    old = Featurizer((channels, 32, 32), hparams, None)
    resnet_policy_reference(old.network, policy, QuantConv2d)
    assert _tree(new) == _tree(old)
    assert sum(isinstance(m, QuantConv2d) for m in new.modules()) == (20 if resnet18 else 53)
    for a, b in zip(new.modules(), old.modules()):
        if isinstance(a, QuantConv2d):
            assert (a.w_quant is None) == (b.w_quant is None)
            assert (a.a_quant is None) == (b.a_quant is None)
            for qa, qb in ((a.w_quant, b.w_quant), (a.a_quant, b.a_quant)):
                assert qa is None or qa.config == qb.config
    state_new, state_old = new.state_dict(), old.state_dict()
    assert list(state_new) == list(state_old)
    assert all(torch.equal(state_new[k], state_old[k]) for k in state_new)

    x = torch.randn(4, channels, 32, 32, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(4, new.n_outputs, generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # the first pass calibrates every scale, the second uses them
        out_new, grads_new = _forward_backward(new, x, grad)
        out_old, grads_old = _forward_backward(old, x, grad)
        assert torch.equal(out_new, out_old)
        assert list(grads_new) == list(grads_old)
        for name, g in grads_new.items():
            assert torch.equal(g, grads_old[name]), name


def test_the_stem_is_the_first_conv_in_module_order():
    """Not the one named ``conv1``: a module whose first conv is called otherwise."""
    net = nn.Sequential()
    net.add_module("pre", nn.Conv2d(3, 4, 3))
    net.add_module("conv1", nn.Conv2d(4, 4, 3))
    quantize(net, QuantPolicy(QuantConfig(4, True), QuantConfig(4, False), QuantConfig(4, True)))
    assert net.pre.w_quant is None and net.pre.a_quant.lower < 0  # signed image input
    assert net.conv1.w_quant.bits == 4 and net.conv1.a_quant.lower == 0


def test_dequantize_gives_the_float_model_back():
    hparams = tiny_hparams("LSQ")
    torch.manual_seed(0)
    float_model = Featurizer((3, 32, 32), hparams, None)
    model = Featurizer((3, 32, 32), hparams, None)
    model.load_state_dict(float_model.state_dict())
    quantize(model.network, quant_policy(hparams))
    x = torch.randn(2, 3, 32, 32)
    model(x)  # calibrated, as a trained model is
    with quantization_disabled(model), torch.no_grad():
        want = model(x)
    assert dequantize(model) is model and not list(quantizers(model))
    assert _tree(model) == _tree(float_model)
    state = model.state_dict()
    assert list(state) == list(float_model.state_dict())
    assert all(torch.equal(v, float_model.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_linears_where_the_policy_says_so_the_last_one_stays_float():
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    w, a = QuantConfig(4, True), QuantConfig(4, False)
    assert not any(isinstance(m, QuantLinear)
                   for m in quantize(nn.Sequential(*net), QuantPolicy(w, a, None)).modules())
    quantize(net, QuantPolicy(w, a, None, linear=True))
    assert [type(m).__name__ for m in net] == ["QuantLinear", "ReLU", "QuantLinear", "ReLU",
                                               "Linear"]
    x = torch.rand(7, 6)
    net(x)  # calibrates
    layer = net[2]
    h = torch.relu(net[0](x)).detach()
    s_a, s_w = layer.a_quant.scale.item(), layer.w_quant.scale.item()
    qa = lsq_forward(h.double().numpy(), np.float64(s_a), 0, 15)
    qw = lsq_forward(layer.weight.detach().double().numpy(), np.float64(s_w), -8, 7)
    want = qa @ qw.T + layer.bias.detach().double().numpy()
    np.testing.assert_allclose(layer(h).detach().double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_device_and_dtype_are_kept():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)).to(torch.float64)
    quantize(net, QuantPolicy(QuantConfig(4, True), QuantConfig(4, False), QuantConfig(4, True)))
    assert all(p.dtype == torch.float64 for n, p in net.named_parameters() if "quant" not in n)
    assert all(isinstance(q.scale, Scale) and q.scale.dtype == torch.float32
               for _, q in quantizers(net))
    meta = nn.Sequential(nn.Conv2d(3, 4, 3, device="meta"), nn.Conv2d(4, 4, 3, device="meta"))
    quantize(meta, QuantPolicy(QuantConfig(4, True), QuantConfig(4, False), None))
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {"meta"}


def test_quantize_refuses_a_quantized_module_and_a_bare_layer():
    policy = QuantPolicy(QuantConfig(4, True), QuantConfig(4, False), None)
    net = quantize(nn.Sequential(nn.Conv2d(3, 4, 3)), policy)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(net, policy)
    with pytest.raises(ValueError, match="not a layer"):
        quantize(nn.Conv2d(3, 4, 3), policy)
