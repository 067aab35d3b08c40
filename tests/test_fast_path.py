"""The fast quantized step against its reference paths (docs/performance.md).

Tolerances: quantized outputs are bit-identical (``torch.equal``) between the fused autograd
Function, its compiled kernels and the plain-autograd reference
(:func:`references.lsq_autograd`), since all compute ``round(v / s) * s`` with the same
float operations. ``dL/dv`` of the reference goes through ``* s`` and
``/ s`` and may differ by float rounding (``rtol = atol = 1e-6`` relative to ``|dL/dq|``);
``dL/ds`` is a sum over the tensor whose order differs between paths (``rtol = 1e-5``,
``atol = 1e-5 * sum|dL/dq|`` times the gradient scale). Whole-model gradients compound those
differences through the network: ``rtol = 1e-4``.
"""

import pytest
import torch
from support.helpers import PYTHON, run, tiny_hparams
from support.references import lsq_autograd
from torch import nn

from domainbed_gaqat.optim.sagm import frozen_bn_statistics
from domainbed_gaqat.plugin.featurizer import Featurizer, quant_policy
from domainbed_gaqat.quant import lsq, modules
from domainbed_gaqat.quant.config import integer_range
from domainbed_gaqat.quant.lsq import lsq_quantize
from domainbed_gaqat.quant.modules import quantizers


def _values(shape: tuple[int, ...], lower: int, upper: int, scale: float,
            seed: int = 0) -> torch.Tensor:
    """Random ``v`` spanning beyond both bounds, with exact bounds and ties planted."""
    g = torch.Generator().manual_seed(seed)
    v = (torch.rand(shape, generator=g) * (upper - lower + 4) + lower - 2) * scale
    planted = torch.tensor([lower, upper, lower + 0.5, upper - 0.5, upper + 0.5, 0.5, -0.0])
    v.view(-1)[: planted.numel()] = planted * scale
    return v


def _run(fn, v: torch.Tensor, scale: torch.Tensor, lower: int, upper: int, grad_scale: float,
         grad_out: torch.Tensor, v_grad: bool = True):
    v = v.clone().requires_grad_(v_grad)
    s = scale.clone().requires_grad_()
    out = fn(v, s, lower, upper, grad_scale)
    out.backward(grad_out)
    return out.detach(), v.grad, s.grad


def _assert_match(fast, ref, grad_out: torch.Tensor, grad_scale: float) -> None:
    assert torch.equal(fast[0], ref[0])
    if ref[1] is not None:
        torch.testing.assert_close(fast[1], ref[1], rtol=1e-6,
                                   atol=1e-6 * grad_out.abs().max().item())
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-5,
                               atol=1e-5 * grad_scale * grad_out.abs().sum().item())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("grad_scale", [1.0, 0.01])
def test_lsq_function_matches_plain_autograd_reference(bits, signed, grad_scale):
    lower, upper = integer_range(bits, signed)
    scale = torch.tensor(0.37)
    v = _values((6, 5, 7, 7), lower, upper, scale.item())
    grad_out = torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
    fast = _run(lsq_quantize, v, scale, lower, upper, grad_scale, grad_out)
    ref = _run(lsq_autograd, v, scale, lower, upper, grad_scale, grad_out)
    _assert_match(fast, ref, grad_out, grad_scale)


def test_lsq_function_channels_last_and_input_without_grad():
    lower, upper = integer_range(4, signed=True)
    scale = torch.tensor(0.2)
    v = _values((4, 8, 5, 5), lower, upper, 0.2).to(memory_format=torch.channels_last)
    grad_out = torch.randn(v.shape).to(memory_format=torch.channels_last)
    for v_grad in (True, False):  # False: the stem's input (the image) needs no gradient
        fast = _run(lsq_quantize, v, scale, lower, upper, 0.1, grad_out, v_grad)
        ref = _run(lsq_autograd, v, scale, lower, upper, 0.1, grad_out, v_grad)
        assert (fast[1] is None) == (not v_grad)
        _assert_match(fast, ref, grad_out, 0.1)


def test_bf16_input_is_quantized_in_float32():
    """A bf16 input is quantized in the float32 scale's precision and returned in bf16 (the
    float32 result rounded once); its gradients are the float32 input's, dL/dv in bf16."""
    lower, upper = integer_range(4, signed=False)
    v = _values((4, 8, 5, 5), lower, upper, 0.3).bfloat16()
    grad_out = torch.randn(v.shape).bfloat16()
    low = _run(lsq_quantize, v, torch.tensor(0.3), lower, upper, 0.1, grad_out)
    full = _run(lsq_quantize, v.float(), torch.tensor(0.3), lower, upper, 0.1, grad_out.float())
    assert low[0].dtype == low[1].dtype == torch.bfloat16 and low[2].dtype == torch.float32
    assert torch.equal(low[0], full[0].bfloat16()) and torch.equal(low[2], full[2])
    assert torch.equal(low[1].float(), full[1])


def test_compiled_kernels_match_eager():
    cases = [(integer_range(4, False), (3, 16, 9, 9)), (integer_range(4, False), (5, 8, 6, 6)),
             (integer_range(3, True), (16, 8, 3, 3))]
    eager, compiled = [], []
    try:
        for results in (eager, compiled):
            if results is compiled:
                lsq.compile_kernels()
            for (lower, upper), shape in cases:
                v = _values(shape, lower, upper, 0.3)
                grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(2))
                results.append(_run(lsq_quantize, v, torch.tensor(0.3), lower, upper, 0.05,
                                    grad_out))
    finally:
        lsq.compile_kernels(False)
    for fast, ref in zip(compiled, eager):
        assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
        torch.testing.assert_close(fast[2], ref[2], rtol=1e-5, atol=1e-6)
    assert lsq._kernels.forward is lsq._forward


def test_compiled_kernels_are_shared_by_weights_of_every_shape():
    """Dynamo specialises on a Parameter's shape; the kernels get plain tensors, so a ResNet's
    many weight shapes do not exhaust its recompile limit (then falling back to eager)."""
    from torch._dynamo.utils import counters

    lower, upper = integer_range(4, signed=True)
    try:
        lsq.compile_kernels()
        graphs = []
        for c in (24, 32, 40, 48, 64, 80, 96, 128, 160, 192):  # all > 4096 elements
            weight = nn.Parameter(torch.randn(c, c, 3, 3))
            lsq_quantize(weight, nn.Parameter(torch.tensor(0.1)), lower, upper).sum().backward()
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        lsq.compile_kernels(False)
    assert graphs[-1] == graphs[0], graphs  # the first shape compiled them; the rest reuse


@pytest.mark.slow
def test_compile_environment_switch():
    code = ("from domainbed_gaqat.quant import lsq as q; "
            "assert q._kernels.forward is not q._forward, 'not compiled'")
    run([PYTHON, "-c", code], timeout=300, DOMAINBED_GAQAT_COMPILE="1")


def test_quantized_featurizer_matches_reference_path(monkeypatch):
    torch.manual_seed(0)
    hparams = tiny_hparams("LSQ", w_bits=3, a_bits=3)
    model = Featurizer((3, 32, 32), hparams, quant_policy(hparams))
    state = model.state_dict()  # scales set by hand: range calibration is not under test
    for name, q in quantizers(model):
        state[f"{name}.scale"] = torch.tensor(0.05 if q.is_weight else 0.3)
        state[f"{name}.initialized"] = torch.tensor(True)
    model.load_state_dict(state)
    x = torch.randn(4, 3, 32, 32)
    grad = torch.randn(4, model.n_outputs)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.backward(grad)
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fast_out, fast_grads = forward_backward()
    calls = []

    def reference(*args):
        calls.append(args[0].shape)
        return lsq_autograd(*args)

    monkeypatch.setattr(modules, "lsq_quantize", reference)  # what LSQQuantizer calls
    ref_out, ref_grads = forward_backward()
    assert len(calls) == len(list(quantizers(model)))
    assert torch.equal(fast_out, ref_out)
    scales = {f"{name}.scale" for name, _ in quantizers(model)}
    assert scales <= set(fast_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], ref, rtol=1e-4,
                                   atol=1e-4 * ref.abs().max().item(), msg=name)


def test_bn_freezing_skips_eval_batchnorms_and_keeps_training_ones_still():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    model[1].eval()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with frozen_bn_statistics(model):
        model(torch.randn(8, 3) * 5 + 2)
    assert model[0].momentum == 0.1 and model[0].training and not model[1].training
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
