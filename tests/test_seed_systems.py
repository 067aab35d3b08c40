"""The other QAT-for-DG systems on the shared featurizer: QT-DoG (weight-only per-channel LSQ
from a start step, its release's behaviour behind a flag), SAQ (case 3) and EoQ."""

import copy
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from domainbed import algorithms as db_algorithms
from domainbed import datasets as db_datasets
from domainbed.lib import misc
from support import references
from support.helpers import PYTHON, gaqat, run, tiny_hparams
from support.references import choose_reference
from torch import nn

from domainbed_gaqat.optim.saq import saq_step
from domainbed_gaqat.quant.config import QuantConfig
from domainbed_gaqat.quant.modules import QuantConv2d, quantizers
from domainbed_gaqat.quant.range_init import mse_scale

SHAPE, CLASSES, DOMAINS = (3, 32, 32), 10, 5


def batches(n: int, seed: int, size: int = 2) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(size, *SHAPE, generator=g), torch.randint(0, CLASSES, (size,),
                                                                    generator=g))
             for _ in range(DOMAINS)] for _ in range(n)]


def build(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return db_algorithms.get_algorithm_class(name)(SHAPE, CLASSES, DOMAINS,
                                                   tiny_hparams(name, **overrides))


# --- per-channel LSQ ---------------------------------------------------------------------


def test_per_channel_mse_equals_brute_force():
    """One scale per output channel: each minimises that channel's error over the same
    candidates ``k / 100 * max|w_c| / u`` (brute force here, in float64)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 3, 3, generator=g) * torch.tensor([0.01, 0.1, 1, 3, 0.5, 2]).view(
        -1, 1, 1, 1) + 0.2  # channels of different ranges, not centred
    w[2] = 0.0  # an all-zero channel: scale 1
    lower, upper = -8, 7
    got = mse_scale(w, lower, upper, channel_axis=0)
    assert got.shape == (6, 1, 1, 1)
    for c in range(6):
        m = w[c].abs().max().item()
        if m == 0:
            assert got[c].item() == 1.0
            continue
        candidates = [k * (m / (100 * upper)) for k in range(1, 101)]
        errors = [float(((torch.clamp(torch.round(w[c].double() / s), lower, upper) * s
                          - w[c].double()) ** 2).sum()) for s in candidates]
        assert got[c].item() == pytest.approx(candidates[int(np.argmin(errors))], rel=1e-6)


@pytest.mark.parametrize("count", ["scale", "tensor"])
def test_per_channel_gradients_against_the_formula(count):
    """dL/ds_c of a per-channel weight quantizer: the LSQ gradient of channel c's entries,
    scaled by ``1 / sqrt(N * u)`` with N the channel's weights (``grad_scale_n="scale"``, the
    LSQ paper) or the whole tensor's (``"tensor"``, QT-DoG's release: ``1 / sqrt(Q_P *
    x.numel())`` in its ``LsqQuan.forward``), written out here."""
    from domainbed_gaqat.quant.modules import LSQQuantizer

    q = LSQQuantizer(QuantConfig(4, True, granularity="channel", grad_scale_n=count),
                     is_weight=True, channels=3)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    q.double()
    with torch.no_grad():
        q.scale.copy_(torch.tensor([0.13, 0.31, 0.07], dtype=torch.float64))
        q.initialized.fill_(True)
    q._initialized = True
    weights = torch.randn(w.shape, generator=g, dtype=torch.float64)
    w.requires_grad_()
    (q(w) * weights).sum().backward()
    n_c = w[0].numel() if count == "scale" else w.numel()
    for c in range(3):
        x = (w[c] / q.scale[c]).detach()
        codes = torch.clamp(torch.round(x), -8, 7)
        # LSQ eq. 3: round(x) - x inside the range, the bound outside
        inner = torch.where((x >= -8) & (x <= 7), torch.round(x) - x, codes)
        expected = (weights[c] * inner).sum() / np.sqrt(n_c * 7)
        assert q.scale.grad[c].item() == pytest.approx(expected.item(), rel=1e-9)
        inside = ((x >= -8) & (x <= 7)).double()
        assert torch.allclose(w.grad[c], weights[c] * inside)
        # the forward value is each channel's own grid
        assert torch.equal(q(w)[c].detach(), codes * q.scale[c].detach())


# --- QT-DoG ------------------------------------------------------------------------------


def _copy_latent(qtdog, erm) -> None:
    state = {k: v for k, v in qtdog.state_dict().items() if k in erm.state_dict()}
    erm.load_state_dict(state, strict=True)


def test_before_the_start_step_qtdog_is_full_precision_then_quantizes():
    start = 3
    qtdog = build("QTDoG", quant_start=start, batch_size=2)
    erm = build("ERM_FP", batch_size=2, weight_decay=0.0)
    _copy_latent(qtdog, erm)
    data = batches(start + 3, seed=2)
    x = data[0][0][0]
    qtdog.eval(), erm.eval()
    with torch.no_grad():
        assert torch.equal(qtdog.predict(x), erm.predict(x))  # the exact identity
    qtdog.train(), erm.train()
    for t in range(start):  # Adam steps on the same batches: bit-identical
        assert qtdog.update(data[t]) == erm.update(data[t])
    for name, p in erm.named_parameters():
        assert torch.equal(dict(qtdog.named_parameters())[name], p), name
    assert not any(bool(q.initialized) or bool(q.enabled) for _, q in quantizers(qtdog))
    weights = {n: m.weight.detach().clone() for n, m in qtdog.named_modules()
               if isinstance(m, QuantConv2d) and m.w_quant is not None}
    qtdog.update(data[start])  # quantization starts: scales from the current weights
    for name, module in qtdog.named_modules():
        if name in weights:
            assert module.w_quant.scale.shape == (module.out_channels,)
            # the release's LsqQuan.init_from: 2 * mean|w_c| / sqrt(Q_P), Q_P = 63 at 7 bits
            w = weights[name].double()
            expected = (2 * w.abs().mean(dim=(1, 2, 3)) / 63 ** 0.5).float()
            assert bool(module.w_quant.enabled) and module.a_quant is None
            before = module.w_quant.scale.detach() + 0  # after one Adam step at lr 1e-5
            assert torch.allclose(before, expected, atol=2e-5, rtol=0)
    stem = qtdog.featurizer.network.conv1
    assert stem.w_quant is None and stem.a_quant is None  # the stem stays full precision


@pytest.mark.parametrize("init, count", [("lsq_mean", "tensor"), ("mse", "scale")])
def test_qtdog_scale_init_and_gradient_scale(init, count):
    """At ``quant_start`` each per-channel scale starts by ``w_scale_init`` (the release's LSQ
    rule by default; MSE: the brute-force candidate of least error) and its gradient is LSQ's
    scaled by ``1 / sqrt(Q_P * N)``, N the whole tensor's size (the release) or a channel's
    (``w_grad_scale_n: scale``): both against :mod:`references`."""
    qtdog = build("QTDoG", quant_start=0, batch_size=2, w_scale_init=init,
                  w_grad_scale_n=count)
    conv = qtdog.featurizer.network.layer2[0].conv2
    w = conv.weight.detach().double().numpy()
    grad_out = np.random.default_rng(0).standard_normal(w.shape)
    q = conv.w_quant(conv.weight)  # initialises the scale from the weights
    scale = conv.w_quant.scale.detach().double().numpy()
    for c in range(0, w.shape[0], 17):
        if init == "lsq_mean":
            assert scale[c] == pytest.approx(2 * np.abs(w[c]).mean() / np.sqrt(63), rel=1e-6)
        else:
            candidates, errors = references.mse_brute_force(w[c], -64, 63)
            assert scale[c] == pytest.approx(candidates[np.argmin(errors)], rel=1e-6)
    (q * torch.from_numpy(grad_out).float()).sum().backward()
    n = w.size if count == "tensor" else w[0].size
    _, want = references.lsq_grads(w, scale.reshape(-1, 1, 1, 1), -64, 63, grad_out,
                                   references.lsq_gradient_scale(n, 63), channel_axis=0,
                                   dtype=np.float32)
    assert np.allclose(conv.w_quant.scale.grad.double().numpy(), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("release", [False, True])
def test_every_parameter_trains_unless_the_release_flag(release):
    start = 1
    qtdog = build("QTDoG", quant_start=start, batch_size=2, qtdog_release=release)
    in_optimizer = {id(p) for group in qtdog.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in qtdog.parameters() if p.requires_grad} == in_optimizer
    data = batches(start + 3, seed=3)
    for batch in data[:start + 1]:  # full precision, then the start: scales initialised
        qtdog.update(batch)
    before = {n: p.detach().clone() for n, p in qtdog.named_parameters()}
    for batch in data[start + 1:]:
        qtdog.update(batch)
    moved = {n for n, p in qtdog.named_parameters() if not torch.equal(p, before[n])}
    conv_weights = {n for n, m in qtdog.named_modules() if isinstance(m, QuantConv2d)}
    conv_weights = {f"{n}.weight" for n in conv_weights}
    scales = {n for n, _ in qtdog.named_parameters() if n.endswith("_quant.scale")}
    bn_affine = {n for n, m in qtdog.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for n in (f"{n}.weight", f"{n}.bias")}
    classifier = {"classifier.weight", "classifier.bias"}
    stem = qtdog.featurizer.network.conv1
    assert (stem.w_quant is not None) == release  # the release quantized the stem
    if release:
        assert not moved & (conv_weights | scales) and bn_affine | classifier <= moved
    else:
        assert moved == set(before)


def test_state_dict_round_trips_before_and_after_the_start(tmp_path):
    qtdog = build("QTDoG", quant_start=2, batch_size=2)
    data = batches(4, seed=4)
    for t, batch in enumerate(data):
        torch.save(qtdog.state_dict(), tmp_path / "s.pt")
        fresh = build("QTDoG", seed=9, quant_start=2, batch_size=2)
        fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True), strict=True)
        fresh.optimizer.load_state_dict(copy.deepcopy(qtdog.optimizer.state_dict()))
        x = batch[0][0]
        qtdog.eval(), fresh.eval()
        with torch.no_grad():
            assert torch.equal(fresh.predict(x), qtdog.predict(x)), t
        qtdog.train(), fresh.train()
        assert fresh.update(batch) == qtdog.update(batch), t


# --- SAQ ---------------------------------------------------------------------------------


class Tiny(nn.Module):
    """A quantized conv, a BatchNorm in training mode, a full-precision linear layer."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(2, 3, 3, bias=False)
        self.conv = QuantConv2d(conv, QuantConfig(3, True), QuantConfig(3, False))
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("act_scales", [True, False])
def test_saq_step_against_an_autograd_reference(act_scales):
    """SAQ's step with the activation scale perturbed and in the norm (the release's
    ``include_aclip``) or left out, against plain autograd: LSQ written out
    (:func:`references.lsq_autograd`), the gradient vector, its norm and the perturbed pass
    by hand."""
    torch.manual_seed(0)
    model = Tiny().double()
    x = torch.rand(5, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    model(x)  # calibrate the quantizers (MSE init), then a clean state
    state = copy.deepcopy(model.state_dict())
    rho = 0.3
    w_scale, a_scale = model.conv.w_quant.scale, model.conv.a_quant.scale
    others = [model.bn.weight, model.bn.bias, model.fc.weight, model.fc.bias]

    # reference, by hand: q = Q(w); g = dL/d(q, others[, a_scale]); eps = rho g / ||g||;
    # the gradients of L(Q(w) + eps_q, others + eps_o[, a_scale + eps_a])
    weight = state["conv.weight"].clone().requires_grad_()
    scales = [state["conv.w_quant.scale"].clone().requires_grad_(),
              state["conv.a_quant.scale"].clone().requires_grad_()]
    g_w = references.lsq_gradient_scale(references.lsq_n(weight.shape, True), 3)
    g_a = references.lsq_gradient_scale(references.lsq_n(x.shape, False), 7)
    params = [state[k].clone().requires_grad_() for k in ("bn.weight", "bn.bias", "fc.weight",
                                                           "fc.bias")]

    def loss_at(q_weight, a_s, p):
        a = references.lsq_autograd(x, a_s, 0, 7, g_a)  # 3-bit unsigned input
        h = F.batch_norm(F.conv2d(a, q_weight), state["bn.running_mean"],
                         state["bn.running_var"], p[0], p[1], training=True, momentum=0.0,
                         eps=model.bn.eps)
        return F.cross_entropy(F.linear(F.relu(h).flatten(1), p[2], p[3]), y)

    def quantized_weight():
        return references.lsq_autograd(weight, scales[0], -4, 3, g_w)  # 3-bit signed

    q_leaf = quantized_weight().detach().requires_grad_()
    clean = loss_at(q_leaf, scales[1], params)
    moved = [q_leaf, *params, *([scales[1]] if act_scales else [])]
    grads = torch.autograd.grad(clean, moved)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    eps = [rho * g / (norm + 1e-12) for g in grads]
    a_perturbed = scales[1] + eps[5] if act_scales else scales[1]
    final = loss_at(quantized_weight() + eps[0], a_perturbed,
                    [p + e for p, e in zip(params, eps[1:5])])
    ref_grads = torch.autograd.grad(final, [weight, *params, *scales])

    model_perturbed = [*others, *([a_scale] if act_scales else [])]
    model_fixed = [w_scale] if act_scales else [w_scale, a_scale]
    stats = (model.bn.running_mean.clone(), model.bn.running_var.clone())
    loss = saq_step(lambda: F.cross_entropy(model(x), y), model, [model.conv],
                    model_perturbed, model_fixed, rho)
    assert loss.item() == pytest.approx(clean.item(), rel=1e-12)
    got = [model.conv.weight.grad, *(p.grad for p in others), w_scale.grad, a_scale.grad]
    for a, b in zip(got, ref_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    for name, value in state.items():  # latent weights and scales restored exactly
        if not name.startswith("bn.running") and name != "bn.num_batches_tracked":
            assert torch.equal(model.state_dict()[name], value), name
    # BatchNorm statistics: the clean pass's update only (momentum 0.1), not the second's
    ref_bn = nn.BatchNorm2d(3).double()
    ref_bn.running_mean.copy_(stats[0]), ref_bn.running_var.copy_(stats[1])
    with torch.no_grad():
        ref_bn.weight.copy_(state["bn.weight"]), ref_bn.bias.copy_(state["bn.bias"])
        ref_bn(F.conv2d(model.conv.a_quant(x), model.conv.w_quant(model.conv.weight)))
    assert torch.allclose(model.bn.running_mean, ref_bn.running_mean, rtol=1e-12)
    assert int(model.bn.num_batches_tracked) == int(state["bn.num_batches_tracked"]) + 1
    assert model.conv.weight_offset is None


def test_saq_algorithm_perturbs_the_activation_scales_unless_told():
    """The algorithm's lists: activation scales perturbed by default (the release's
    ``include_aclip=True``), weight scales never (``include_wclip=False``)."""
    for flag in (True, False):
        saq = build("SAQ", saq_perturb_act_scales=flag, batch_size=2)
        act = {id(q.scale) for _, q in quantizers(saq) if not q.is_weight}
        weight = {id(q.scale) for _, q in quantizers(saq) if q.is_weight}
        perturbed = {id(p) for p in saq.perturbed}
        assert act <= perturbed if flag else not act & perturbed
        assert not weight & perturbed and weight <= {id(p) for p in saq.unperturbed}
        assert len(saq.perturbed) + len(saq.unperturbed) + len(saq.quantized) == len(
            [p for p in saq.parameters() if p.requires_grad])


def test_saq_step_with_an_unused_parameter():
    """A trainable parameter the loss does not reach (no ``.grad``): it counts as a zero
    gradient, so the step equals the one without it, and its gradient is zero or absent."""
    torch.manual_seed(0)
    model = Tiny().double()
    x, y = torch.rand(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    model(x)
    twin = copy.deepcopy(model)
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def step(m, extra):
        others = [m.bn.weight, m.bn.bias, m.fc.weight, m.fc.bias]
        saq_step(lambda: F.cross_entropy(m(x), y), m, [m.conv], [*others, *extra],
                 [m.conv.w_quant.scale, m.conv.a_quant.scale], 0.3)
        return [p.grad for p in m.parameters()]

    for a, b in zip(step(model, [unused]), step(twin, [])):
        assert torch.equal(a, b)
    assert unused.grad is None or not unused.grad.any()
    assert torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64))


def test_saq_algorithm_defaults_and_grid():
    from domainbed import hparams_registry

    assert hparams_registry.default_hparams("SAQ", "PACS")["rho"] == 0.1
    drawn = {hparams_registry.random_hparams("SAQ", "PACS", s)["rho"] for s in range(1, 60)}
    assert drawn == {0.05, 0.1, 0.3, 0.4}
    assert "alpha" not in hparams_registry.default_hparams("SAQ", "PACS")
    assert hparams_registry.default_hparams("SAQ", "PACS")["saq_perturb_act_scales"] is True
    qtdog = hparams_registry.default_hparams("QTDoG", "PACS")
    assert (qtdog["w_bits"], qtdog["w_per_channel"], qtdog["quant_start"], qtdog["lr"],
            qtdog["weight_decay"]) == (7, True, 2000, 5e-5, 0.0) and "a_bits" not in qtdog
    assert (qtdog["w_scale_init"], qtdog["w_grad_scale_n"]) == ("lsq_mean", "tensor")


# --- EoQ ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three QTDoG runs of DomainBed's train.py that differ only in seed (quantized from step
    1), and one with another test env."""
    root = tmp_path_factory.mktemp("eoq")
    hparams = json.dumps({"batch_size": 4, "quant_start": 1})

    def train(item):
        name, seed, env = item
        out = root / name
        run([PYTHON, "-m", "domainbed.scripts.train", "--dataset", "RotatedDigits",
             "--algorithm", "QTDoG", "--test_envs", str(env), "--steps", "3", "--seed",
             str(seed), "--hparams", hparams, "--output_dir", str(out)], timeout=900,
            OMP_NUM_THREADS="1")
        return out

    jobs = [("m0", 0, 5), ("m1", 1, 5), ("m2", 2, 5), ("other_env", 0, 4)]
    with ThreadPoolExecutor(2) as pool:
        return dict(zip([j[0] for j in jobs], pool.map(train, jobs)))


@pytest.mark.slow
def test_eoq_is_the_sum_of_the_members_logits(members, tmp_path, capsys):
    runs = [members[f"m{i}"] for i in range(3)]
    out = tmp_path / "eoq.json"
    assert gaqat("ensemble", *map(str, runs), "--json", str(out)) == 0
    record = json.loads(out.read_text())
    assert "QTDoG+EoQ of 3 members" in capsys.readouterr().out

    # by hand: each member's model, DomainBed's splits of every env, summed logits
    ckpts = [torch.load(r / "model.pkl", weights_only=True) for r in runs]
    models = []
    for ckpt in ckpts:
        model = db_algorithms.QTDoG(ckpt["model_input_shape"], ckpt["model_num_classes"],
                                    ckpt["model_num_domains"],
                                    {**ckpt["model_hparams"], "init": "none"})
        model.load_state_dict(ckpt["model_dict"])
        models.append(model.eval())
    dataset = db_datasets.RotatedDigits(None, [5], {})
    for env_i, env in enumerate(dataset):
        out_split, in_split = misc.split_dataset(env, int(len(env) * 0.2),
                                                 misc.seed_hash(0, env_i))
        if env_i == 5:  # train.py's (empty) uda split of the test env reorders its in-split
            _, in_split = misc.split_dataset(in_split, 0, misc.seed_hash(0, env_i))
        for which, split in (("in", in_split), ("out", out_split)):
            x = torch.stack([split[i][0] for i in range(len(split))])
            y = torch.tensor([split[i][1] for i in range(len(split))])
            with torch.no_grad():
                logits = sum(m.predict(x) for m in models)
            expected = (logits.argmax(1) == y).double().mean().item()
            assert record[f"env{env_i}_{which}_acc"] == pytest.approx(expected, abs=1e-12)
    assert record["args"]["algorithm"] == "QTDoG+EoQ" and len(set(record["seeds"])) == 3

    # the tables show it as a row
    assert gaqat("tables", "--input_dir", *map(str, runs), "--ensembles", str(out),
                 "--format", "csv") == 0
    table = capsys.readouterr().out
    assert "QTDoG+EoQ,7/FP,75," in table and "QTDoG,7/FP,75," in table


@pytest.mark.slow
def test_members_must_differ_only_in_seed(members, capsys):
    assert gaqat("ensemble", str(members["m0"]), str(members["other_env"])) == 2
    assert "members must share test_envs" in capsys.readouterr().err
    assert gaqat("ensemble", str(members["m0"]), str(members["m0"])) == 2
    assert "members must differ in their seed" in capsys.readouterr().err
    assert gaqat("ensemble", str(members["m0"])) == 2
    assert "two or more runs" in capsys.readouterr().err


def test_sweep_members_differ_only_in_seed(tmp_path):
    from domainbed_gaqat.experiments.configs import load_config
    from domainbed_gaqat.experiments.runs import RunSpec
    from domainbed_gaqat.experiments.sweep import plan

    stage = plan(load_config("qtdog_pacs"), tmp_path, tmp_path)[0]
    assert len(stage.jobs) == 2 * 3 * 4 * 5 and stage.folder.endswith("PACS/w7")
    by_cell = {}
    for job in stage.jobs:
        args = job.train_args
        by_cell.setdefault((args["algorithm"], tuple(args["test_envs"]), args["trial_seed"]),
                           []).append(args)
    for cell in by_cell.values():
        assert len(cell) == 5 and len({a["hparams"] for a in cell}) == 1
        assert len({a["seed"] for a in cell}) == 5 and len({a["hparams_seed"] for a in cell}) == 5
        assert sorted(a.get("member", 0) for a in cell) == list(range(5))
        # found on disk by what they recorded: five runs, not one job repeated
        assert len({RunSpec.from_train_args(a).identity for a in cell}) == 5
    hp = json.loads(stage.jobs[0].train_args["hparams"])
    assert (hp["w_bits"], hp["quant_start"], hp["init"], hp["batch_size"]) == (
        7, 2000, "torchvision", 32)



@pytest.mark.slow
def test_qtdog_exports_per_channel_int8_weights(members, tmp_path):
    """Weight-only, per-channel 7-bit weights: INT8 codes with one scale per output channel
    (DequantizeLinear on axis 0), activations float; onnxruntime agrees with PyTorch."""
    import onnx
    from onnx import numpy_helper

    assert gaqat("export", str(members["m0"] / "model.pkl"), "--n_random", "8",
                 "--output_dir", str(tmp_path)) == 0
    report = json.loads((tmp_path / "export.json").read_text())
    assert (report["w_bits"], report["a_bits"]) == (7, None)
    assert report["random_check"]["argmax_agreement"] == 1.0
    graph = onnx.load(str(tmp_path / "model_int.onnx")).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    codes = init["layer1.0.conv1.w_int"]
    assert codes.dtype == np.int8 and codes.min() >= -64 and codes.max() <= 63
    assert init["layer1.0.conv1.w_scale"].shape == (codes.shape[0],)
    assert not any(n.op_type == "QuantizeLinear" for n in graph.node)  # no activation Q/DQ


@pytest.mark.slow
def test_member_sweep_moved_then_eoq_and_tables(tmp_path, capsys):
    """A stage with ``members`` (qtdog_pacs on RotatedDigits: 3 members of one job, 3 steps)
    through gaqat sweep, its tree then moved: gaqat ensemble --config finds three runs (not one
    job three times), and gaqat tables counts each member as a trial of the QTDoG row, next to
    the EoQ row."""
    config = tmp_path / "tiny_qtdog.py"
    config.write_text("SWEEP = " + repr({
        "extends": "qtdog_pacs", "dataset": "RotatedDigits", "test_envs": [[5]], "trials": 1,
        "hparams": {"batch_size": 4},
        "stages": [{"name": "qtdog", "algorithms": ["QTDoG"], "steps": 3,
                    "checkpoint_freq": 3, "members": 3,
                    "hparams": {"init": "none", "quant_start": 1}}]}) + "\n")
    out, moved = tmp_path / "out", tmp_path / "moved"
    assert gaqat("sweep", "launch", str(config), "--output_dir", str(out), "--data_dir",
                 str(tmp_path), "--command_launcher", "local", "--skip_confirmation") == 0
    out.rename(moved)
    assert gaqat("ensemble", "--config", str(config), "--output_dir", str(moved),
                 "--json_dir", str(tmp_path / "eoq")) == 0
    [eoq] = list((tmp_path / "eoq").glob("*.json"))
    members = json.loads(eoq.read_text())["members"]
    assert len(set(members)) == 3 and all(str(moved) in m for m in members)

    capsys.readouterr()
    assert gaqat("tables", str(config), "--output_dir", str(moved), "--format", "csv",
                 "--ensembles", str(eoq)) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    rows = table[table.domain != "Avg"].set_index("algorithm")
    assert rows.loc["QTDoG", "n_trials"] == 3 and rows.loc["QTDoG+EoQ", "n_trials"] == 1
    records = {m: [json.loads(line) for line in
                   (Path(m).parent / "results.jsonl").read_text().splitlines()] for m in members}
    assert sorted(r[0]["args"].get("member", 0) for r in records.values()) == [0, 1, 2]
    chosen = [choose_reference([(m, r, 0)], "train")[1] for m, r in records.items()]
    assert rows.loc["QTDoG", "test_mean"] == pytest.approx(
        100 * np.mean([r["env5_in_acc"] for r in chosen]), abs=1e-4)
