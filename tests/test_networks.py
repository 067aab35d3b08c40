"""The shared featurizer (paper sec. 4.1): quantization policy, frozen BatchNorm, initialisation
from checkpoints built here (MoCo-v2 style, DomainBed ``model.pkl``, torchvision hub cache),
clear errors for wrong files, and ``state_dict`` round-trips."""

import os
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from domainbed import algorithms as db_algorithms
from domainbed.lib import misc
from support.helpers import tiny_hparams
from support.references import integer_grid, lsq_gradient_scale, lsq_n
from torch import nn

from domainbed_gaqat.plugin.algorithms import ALGORITHMS
from domainbed_gaqat.plugin.featurizer import Featurizer
from domainbed_gaqat.plugin.hooks import hosted
from domainbed_gaqat.quant.modules import LSQQuantizer, QuantConv2d, quantizers
from domainbed_gaqat.quant.range_init import mse_scale

SHAPE = (3, 32, 32)
N_CLASSES, N_DOMAINS = 10, 5
BN = nn.modules.batchnorm._BatchNorm


def _algorithm(name: str, **overrides) -> db_algorithms.Algorithm:
    """A plugin algorithm built through DomainBed's registry, as ``gaqat train`` does (inside
    :func:`hosted`: SWAD's algorithms need its loop)."""
    cls = db_algorithms.get_algorithm_class(name)
    with hosted():
        return cls(SHAPE, N_CLASSES, N_DOMAINS, tiny_hparams(name, **overrides))


def _batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=gen), torch.randint(0, N_CLASSES, (n,), generator=gen)


def _random_resnet(resnet18: bool = True, seed: int = 0) -> nn.Module:
    """A torchvision ResNet with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    net = (torchvision.models.resnet18 if resnet18 else torchvision.models.resnet50)(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, BN):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net


def _assert_codes(t: torch.Tensor, raw: torch.Tensor, q: LSQQuantizer) -> torch.Tensor:
    """Assert ``t`` is ``raw`` quantized on ``q``'s grid: ``t / s`` is an integer in ``[l, u]``
    and equals ``clamp(round(raw / s))`` (float64 here; an exact tie may round either way in
    float32). Returns the integer codes."""
    step = max(1, t.numel() // 20000)  # every step-th entry: cheap on ResNet-50's weights
    t, raw = t.flatten()[::step], raw.flatten()[::step]
    s = q.scale.item()
    codes = t.double() / s
    assert torch.allclose(codes, codes.round(), atol=1e-3), "not on the integer grid times s"
    codes = codes.round()
    assert codes.min() >= q.lower and codes.max() <= q.upper
    x = raw.double() / s
    expected = x.round().clamp(q.lower, q.upper)
    near_tie = ((x - x.floor()) - 0.5).abs() < 1e-4
    assert not ((codes != expected) & ~near_tie).any()
    return codes


def _set_scales(module: nn.Module, activation_scale: float = 0.1) -> None:
    """Mark every quantizer initialised with a cheap scale (min-max for weights), so a forward
    pass skips the MSE calibration (tested elsewhere): the policy does not depend on it."""
    for m in module.modules():
        if isinstance(m, QuantConv2d):
            if m.a_quant is not None:
                m.a_quant.load_state_dict({"scale": torch.tensor(activation_scale),
                                           "initialized": torch.tensor(True)}, strict=False)
            if m.w_quant is not None:
                w = m.weight.detach().abs()
                scale = (w.amax(dim=(1, 2, 3)) if m.w_quant.scale.dim() else w.max())
                m.w_quant.load_state_dict({"scale": scale / m.w_quant.upper,
                                           "initialized": torch.tensor(True)}, strict=False)


# --- quantization policy ---------------------------------------------------------------------


@pytest.mark.parametrize("resnet18, w_bits, a_bits", [
    (True, 3, 3), (True, 2, 8), (True, 8, 2), (False, 4, 4),
])
def test_exactly_the_specified_modules_are_quantized(monkeypatch, resnet18, w_bits, a_bits):
    """Every conv quantizes its weight (signed grid) and its input (unsigned grid), except the
    stem conv: input only, signed grid, full-precision weight. The classifier and everything
    else stay full precision. Checked on what the convolutions actually receive."""
    algorithm = _algorithm("LSQ", resnet18=resnet18, w_bits=w_bits, a_bits=a_bits)
    reference = (torchvision.models.resnet18 if resnet18 else torchvision.models.resnet50)()
    convs = [n for n, m in reference.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == (20 if resnet18 else 53)
    network = algorithm.featurizer.network
    modules = dict(network.named_modules())

    expected = {f"featurizer.network.{c}.a_quant" for c in convs}
    expected |= {f"featurizer.network.{c}.w_quant" for c in convs if c != "conv1"}
    assert {name for name, _ in quantizers(algorithm)} == expected
    assert not [n for n, m in algorithm.named_modules()
                if isinstance(m, nn.Conv2d) and not isinstance(m, QuantConv2d)]
    assert type(algorithm.classifier) is nn.Linear and isinstance(network.fc, nn.Identity)
    assert not list(quantizers(algorithm.classifier))

    stem = modules["conv1"]
    assert stem.w_quant is None
    assert (stem.a_quant.lower, stem.a_quant.upper) == (-(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1)
    for name in convs[1:]:
        conv = modules[name]
        assert (conv.w_quant.lower, conv.w_quant.upper) == (-(2 ** (w_bits - 1)),
                                                            2 ** (w_bits - 1) - 1)
        assert (conv.a_quant.lower, conv.a_quant.upper) == (0, 2**a_bits - 1)

    # What reaches F.conv2d / F.linear in a forward pass.
    current, raw_inputs, conv_calls, linear_calls = [None], {}, [], []
    conv2d, linear = F.conv2d, F.linear

    def record_conv(x, weight, *args, **kwargs):
        conv_calls.append((current[0], x.detach(), weight.detach()))
        return conv2d(x, weight, *args, **kwargs)

    def record_linear(x, weight, *args, **kwargs):
        linear_calls.append((x.detach(), weight))
        return linear(x, weight, *args, **kwargs)

    def pre_hook(name):
        def hook(module, args):
            current[0] = name
            raw_inputs[name] = args[0].detach()
        return hook

    for name in convs:
        modules[name].register_forward_pre_hook(pre_hook(name))
    _set_scales(algorithm)
    monkeypatch.setattr(F, "conv2d", record_conv)
    monkeypatch.setattr(F, "linear", record_linear)
    x, _ = _batch(2)
    algorithm.predict(x)
    monkeypatch.undo()

    assert [c[0] for c in conv_calls] == convs  # each conv once, in forward order
    for name, inp, weight in conv_calls:
        conv = modules[name]
        in_codes = _assert_codes(inp, raw_inputs[name], conv.a_quant)
        if name == "conv1":
            assert (in_codes < 0).any()  # the normalised image keeps its negative half
            assert torch.equal(weight, conv.weight.detach())  # full precision
            assert weight.unique().numel() > 2**w_bits
        else:
            _assert_codes(weight, conv.weight.detach(), conv.w_quant)
    assert len(linear_calls) == 1 and linear_calls[0][1] is algorithm.classifier.weight
    assert linear_calls[0][0].shape == (2, 512 if resnet18 else 2048)


def test_lsq_grad_scale_hparam_reaches_every_quantizer():
    """``lsq_grad_scale`` on: each scale's gradient is LSQ's ``g = 1 / sqrt(N * Q_P)`` times
    its gradient with the option off (LSQ sec. 2.2; :mod:`references` for ``N``), from the
    same state and batch, on every quantizer of the featurizer, the stem's included."""
    grads, shapes = {}, {}
    x, y = _batch(2)
    for option in (False, True):
        torch.manual_seed(0)
        algorithm = _algorithm("LSQ", lsq_grad_scale=option)
        _set_scales(algorithm)
        hooks = [q.register_forward_pre_hook(
            lambda m, a, name=name: shapes.__setitem__(name, tuple(a[0].shape)))
            for name, q in quantizers(algorithm)]
        F.cross_entropy(algorithm.predict(x), y).backward()
        for h in hooks:
            h.remove()
        grads[option] = {name: q.scale.grad.item() for name, q in quantizers(algorithm)}
        assert all(q.config.grad_scale is option for _, q in quantizers(algorithm))
    assert len(grads[True]) == 39  # ResNet-18: 20 activation + 19 weight quantizers
    for name, off in grads[False].items():
        is_weight = name.endswith("w_quant")
        signed = is_weight or name == "featurizer.network.conv1.a_quant"  # the image: signed
        g = lsq_gradient_scale(lsq_n(shapes[name], is_weight), integer_grid(4, signed)[1])
        assert off != 0, name
        assert grads[True][name] == pytest.approx(g * off, rel=1e-4), name


def test_full_precision_mode_has_no_quantizers(monkeypatch):
    algorithm = _algorithm("ERM_FP")
    assert not list(quantizers(algorithm))
    convs = [m for m in algorithm.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and all(type(m) is nn.Conv2d for m in convs)
    weights, conv2d = [], F.conv2d

    def record(x, weight, *args, **kwargs):
        weights.append(weight)
        return conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", record)
    algorithm.predict(_batch(2)[0])
    assert [id(w) for w in weights] == [id(m.weight) for m in convs]


@pytest.mark.parametrize("overrides", [{"w_bits": 9}, {"a_bits": 1}, {"w_bits": 0}])
def test_bits_outside_2_to_8_are_rejected(overrides):
    with pytest.raises(ValueError, match=r"2\.\.8"):
        _algorithm("LSQ", **overrides)


# --- frozen BatchNorm ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_batchnorm_stays_frozen(name):
    algorithm = _algorithm(name)
    bns = [m for m in algorithm.modules() if isinstance(m, BN)]
    assert len(bns) == 20

    def check_frozen(training: bool) -> None:
        assert all(not bn.training for bn in bns)
        assert algorithm.featurizer.training == training
        assert algorithm.featurizer.dropout.training == training

    check_frozen(True)
    algorithm.eval()
    check_frozen(False)
    algorithm.train()
    check_frozen(True)

    x, y = _batch(4, seed=1)
    _set_scales(algorithm)
    stats = {k: v.clone() for k, v in algorithm.state_dict().items()
             if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}
    assert len(stats) == 3 * len(bns)
    algorithm.update([(x[:2], y[:2]), (x[2:], y[2:])])
    after = algorithm.state_dict()
    for k, v in stats.items():
        assert torch.equal(after[k], v), k

    # DomainBed's evaluation switches eval()/train() around each loader.
    loader = [(x, y)]
    misc.accuracy(algorithm, loader, None, "cpu")
    check_frozen(True)
    # Train mode normalises with the running statistics too: same output as eval mode.
    with torch.no_grad():
        train_out = algorithm.predict(x)
        algorithm.eval()
        eval_out = algorithm.predict(x)
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)


# --- initialisation from checkpoints ---------------------------------------------------------


def _moco_file(path, net: nn.Module, drop: str | None = None, **extra) -> str:
    """A MoCo-v2 style checkpoint: ``state_dict`` with ``module.encoder_q.*`` (MLP head ``fc.0``
    / ``fc.2``), ``module.encoder_k.*`` and the queue, as in the official files."""
    backbone = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.") and k != drop}
    width = net.fc.in_features
    head = {"fc.0.weight": torch.randn(width, width), "fc.0.bias": torch.randn(width),
            "fc.2.weight": torch.randn(128, width), "fc.2.bias": torch.randn(128)}
    state = {f"module.encoder_q.{k}": v for k, v in {**backbone, **head}.items()}
    state |= {f"module.encoder_k.{k}": v.clone() for k, v in {**backbone, **head}.items()}
    state |= {"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1).long()}
    state |= extra
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0]}]}}, path)
    return str(path)


def _assert_backbone_equal(featurizer: Featurizer, net: nn.Module) -> None:
    own = featurizer.network.state_dict()
    source = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    assert source and not [k for k in own if k not in source and "_quant." not in k]
    for k, v in source.items():
        assert torch.equal(own[k], v), k


@pytest.mark.parametrize("name", ["LSQ", "ERM_FP"])
def test_moco_checkpoint_loads(tmp_path, monkeypatch, name):
    net = _random_resnet(seed=1)
    path = _moco_file(tmp_path / "moco_v2_800ep_pretrain.pth.tar", net)
    _assert_backbone_equal(_algorithm(name, init="moco", init_path=path).featurizer, net)
    monkeypatch.setenv("DOMAINBED_GAQAT_MOCO", path)  # the file can also come from the env
    _assert_backbone_equal(_algorithm(name, init="moco", init_path="").featurizer, net)


def _save_like_domainbed(algorithm, hparams: dict, path) -> str:
    """``model.pkl`` as DomainBed's ``train.py`` writes it (``save_checkpoint``)."""
    args = {"data_dir": "/data", "dataset": "RotatedDigits", "algorithm": "ERM_FP",
            "task": "domain_generalization", "hparams": None, "hparams_seed": 0,
            "trial_seed": 0, "seed": 0, "steps": 2, "checkpoint_freq": None, "test_envs": [5],
            "output_dir": str(path.parent), "holdout_fraction": 0.2,
            "uda_holdout_fraction": 0, "skip_model_save": False,
            "save_model_every_checkpoint": False}
    torch.save({"args": args, "model_input_shape": SHAPE, "model_num_classes": N_CLASSES,
                "model_num_domains": N_DOMAINS, "model_hparams": hparams,
                "model_dict": algorithm.state_dict()}, path)
    return str(path)


def test_domainbed_model_pkl_loads_into_lsq(tmp_path):
    torch.manual_seed(2)
    hparams = tiny_hparams("ERM_FP")
    erm = db_algorithms.ERM_FP(SHAPE, N_CLASSES, N_DOMAINS, hparams)
    erm.featurizer.network.load_state_dict(_random_resnet(seed=2).state_dict(), strict=False)
    x, _ = _batch(4, seed=2)
    path = _save_like_domainbed(erm, hparams, tmp_path / "model.pkl")

    lsq = _algorithm("LSQ", init="domainbed", init_path=path)
    own = lsq.featurizer.state_dict()
    for k, v in erm.featurizer.state_dict().items():
        assert torch.equal(own[k], v), k
    for k, v in erm.classifier.state_dict().items():
        assert torch.equal(lsq.classifier.state_dict()[k], v), k

    named = dict(quantizers(lsq))
    assert named and not any(bool(q.initialized) for q in named.values())
    lsq.predict(x)  # calibration: weights from the loaded weights, activations from the batch
    assert all(bool(q.initialized) for q in named.values())
    network = lsq.featurizer.network
    for name in ("layer1.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2"):
        conv = network.get_submodule(name)
        q = conv.w_quant
        assert q.scale.item() == mse_scale(conv.weight, q.lower, q.upper).item(), name
    stem = network.conv1.a_quant
    assert stem.scale.item() == mse_scale(x, stem.lower, stem.upper).item()


def test_torchvision_weights_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    path = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(url)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        _algorithm("LSQ", init="torchvision")
    net = _random_resnet(seed=3)
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)  # torchvision's files are plain state_dicts with fc
    _assert_backbone_equal(_algorithm("LSQ", init="torchvision").featurizer, net)


class _RunsCode:
    """Pickles as a call to ``os.mkdir``: a loader that is not weights-only would run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def wrong_files(tmp_path_factory) -> dict:
    """``name -> (init, path, exception, extra fragments expected in the message)``."""
    tmp_path = tmp_path_factory.mktemp("wrong_files")
    net = _random_resnet(seed=4)
    cases = {"missing": ("moco", tmp_path / "absent.pth.tar", FileNotFoundError, [])}

    torch.save(net.state_dict(), tmp_path / "plain.pth")
    cases["moco_keys"] = ("moco", tmp_path / "plain.pth", ValueError, ["encoder_q"])

    _moco_file(tmp_path / "drop.pth", net, drop="layer4.1.bn2.running_var")
    cases["moco_missing_key"] = ("moco", tmp_path / "drop.pth", ValueError,
                                 ["layer4.1.bn2.running_var"])

    _moco_file(tmp_path / "shape.pth", net,
               **{"module.encoder_q.layer1.0.conv1.weight": torch.randn(64, 64, 1, 1)})
    cases["moco_shape"] = ("moco", tmp_path / "shape.pth", ValueError,
                           ["shape mismatch", "layer1.0.conv1.weight"])

    _moco_file(tmp_path / "r50.pth", _random_resnet(resnet18=False, seed=4))
    cases["moco_resnet50_into_resnet18"] = ("moco", tmp_path / "r50.pth", ValueError,
                                            ["unexpected"])

    torch.save({"args": {}, "model_hparams": {}}, tmp_path / "nodict.pkl")
    cases["domainbed_no_model_dict"] = ("domainbed", tmp_path / "nodict.pkl", ValueError,
                                        ["model_dict"])

    other = db_algorithms.ERM_FP(SHAPE, 7, N_DOMAINS, tiny_hparams("ERM_FP"))
    torch.save({"model_dict": other.state_dict()}, tmp_path / "classes.pkl")
    cases["domainbed_num_classes"] = ("domainbed", tmp_path / "classes.pkl", ValueError,
                                      ["shape mismatch", "weight"])

    for init in ("moco", "domainbed"):
        name = tmp_path / f"code_{init}.pkl"
        torch.save({"state_dict": _RunsCode(str(tmp_path / "pwned")),
                    "model_dict": _RunsCode(str(tmp_path / "pwned"))}, name)
        cases[f"not_weights_only_{init}"] = (init, name, ValueError, ["weights-only"])

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    cases["garbage"] = ("domainbed", tmp_path / "garbage.pth", ValueError, [])
    cases["marker"] = tmp_path / "pwned"
    return cases


CASES = ["missing", "moco_keys", "moco_missing_key", "moco_shape", "moco_resnet50_into_resnet18",
         "domainbed_no_model_dict", "domainbed_num_classes", "not_weights_only_moco",
         "not_weights_only_domainbed", "garbage"]


@pytest.mark.parametrize("case", CASES)
def test_wrong_checkpoints_fail_clearly(wrong_files, case):
    init, path, error, fragments = wrong_files[case]
    with pytest.raises(error) as info:
        _algorithm("LSQ", init=init, init_path=str(path))
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert not wrong_files["marker"].exists()  # nothing in the file was executed


def test_torchvision_file_that_is_not_a_state_dict(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    path = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True)
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        _algorithm("LSQ", init="torchvision")


def test_unknown_init_and_missing_moco_path(monkeypatch):
    with pytest.raises(ValueError, match="imagenet"):
        _algorithm("LSQ", init="imagenet")
    monkeypatch.delenv("DOMAINBED_GAQAT_MOCO", raising=False)
    with pytest.raises(FileNotFoundError, match="DOMAINBED_GAQAT_MOCO"):
        _algorithm("LSQ", init="moco", init_path="")


# --- state_dict round-trip -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_state_dict_round_trips_strictly(name):
    torch.manual_seed(5)
    trained = _algorithm(name)
    _set_scales(trained)  # stands in for the calibration, which is tested elsewhere
    fresh_keys = set(_algorithm(name).state_dict())
    x, y = _batch(4, seed=5)
    trained.update([(x[:2], y[:2]), (x[2:], y[2:])])
    state = trained.state_dict()
    assert set(state) == fresh_keys  # every scale exists from construction on

    restored = _algorithm(name)
    restored.load_state_dict(state, strict=True)
    trained.eval()
    restored.eval()
    test_x = _batch(3, seed=6)[0]
    with torch.no_grad():
        assert torch.equal(restored.predict(test_x), trained.predict(test_x))
    for (n, a), (_, b) in zip(quantizers(trained), quantizers(restored)):
        assert torch.equal(a.scale, b.scale), n  # restored, not re-calibrated
