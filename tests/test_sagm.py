"""The SAGM step (paper sec. 2.2 and Eq. 1) against a plain-autograd reference.

The reference is computed on a deep copy of a tiny model (conv -> BatchNorm in *train* mode ->
ReLU -> activation quantizer -> linear with a weight quantizer) with ``torch.autograd.grad``:
``g = grad L(w)``, ``w' = w + g * (rho / (||g|| + 1e-12) - alpha)`` with ``||g||`` over the
latent weights only, ``g_p = grad L(w')`` with the quantizer scales left at their values.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domainbed_gaqat.optim.sagm import frozen_bn_statistics, sagm_step
from domainbed_gaqat.quant.config import QuantConfig
from domainbed_gaqat.quant.modules import LSQQuantizer

RHO, ALPHA = 0.05, 0.001


class Tiny(nn.Module):
    """Conv + BatchNorm + LSQ activation quantizer + linear with an LSQ weight quantizer."""

    def __init__(self, bn_momentum: float | None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3, momentum=bn_momentum)
        self.a_quant = LSQQuantizer(QuantConfig(3, False, grad_scale=False), is_weight=False)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.w_quant = LSQQuantizer(QuantConfig(4, True), is_weight=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a_quant(F.relu(self.bn(self.conv(x))))
        return F.linear(h.flatten(1), self.w_quant(self.fc.weight), self.fc.bias)


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.bn.state_dict().items()}


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    scales = [model.a_quant.scale, model.w_quant.scale]
    ids = {id(s) for s in scales}
    return [p for p in model.parameters() if id(p) not in ids], scales


def make_case(dtype: torch.dtype, bn_momentum: float | None):
    torch.manual_seed(0)
    model = Tiny(bn_momentum).to(dtype)
    x = torch.randn(6, 2, 6, 6, dtype=dtype)
    y = torch.randint(0, 5, (6,))
    model.eval()  # calibrate the quantizer scales without touching the BN statistics
    with torch.no_grad():
        model(x)
    model.train()
    return model, x, y


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """SAGM by hand on a copy of ``model``: both passes with ``torch.autograd.grad``."""
    ref = copy.deepcopy(model)
    weights, scales = split_params(ref)
    loss = F.cross_entropy(ref(x), y)  # train mode: BN statistics move once
    bn_after_first = bn_state(ref)
    grads = torch.autograd.grad(loss, [*weights, *scales])
    g, g_task = grads[:len(weights)], torch.stack(grads[len(weights):])
    norm = torch.sqrt(sum((t * t).sum() for t in g))
    perturbed = [w.detach() + t * (RHO / (norm + 1e-12) - ALPHA) for w, t in zip(weights, g)]
    names = [n for n, p in ref.named_parameters() if id(p) not in {id(s) for s in scales}]
    leaves = [p.clone().requires_grad_(True) for p in perturbed]
    out = torch.func.functional_call(ref, dict(zip(names, leaves)), (x,))
    grads_p = torch.autograd.grad(F.cross_entropy(out, y), [*leaves, *scales])
    g_p, g_smooth = grads_p[:len(weights)], torch.stack(grads_p[len(weights):])
    norm_with_scales = torch.sqrt(norm**2 + (g_task**2).sum())
    return {
        "loss": loss.detach(), "g": g, "g_p": g_p, "g_task": g_task, "g_smooth": g_smooth,
        "perturbed": perturbed, "bn": bn_after_first,
        "perturbed_if_scales_counted": [
            w.detach() + t * (RHO / (norm_with_scales + 1e-12) - ALPHA) for w, t in zip(weights, g)
        ],
    }


def run_sagm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """``sagm_step`` with a loss closure that records what each of its two passes saw."""
    weights, scales = split_params(model)
    seen: list[dict] = []

    def loss_fn() -> torch.Tensor:
        record = {"weights": [w.detach().clone() for w in weights],
                  "scales": [s.detach().clone() for s in scales]}
        loss = F.cross_entropy(model(x), y)
        record["bn"] = bn_state(model)
        seen.append(record)
        return loss

    loss, g_task, g_smooth = sagm_step(loss_fn, model, weights, scales, RHO, ALPHA)
    return {"loss": loss, "g_task": g_task, "g_smooth": g_smooth, "seen": seen,
            "grads": [w.grad.detach().clone() for w in weights]}


def tolerance(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-10, "atol": 1e-13} if dtype == torch.float64 else {"rtol": 1e-4,
                                                                           "atol": 1e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bn_momentum", [0.1, None])
def test_sagm_step_matches_autograd_reference(dtype: torch.dtype,
                                              bn_momentum: float | None) -> None:
    model, x, y = make_case(dtype, bn_momentum)
    bn_before = bn_state(model)
    weights, scales = split_params(model)
    w_before = [w.detach().clone() for w in weights]
    s_before = [s.detach().clone() for s in scales]
    ref = reference(model, x, y)
    out = run_sagm(model, x, y)
    tol = tolerance(dtype)

    assert len(out["seen"]) == 2, "sagm_step must run exactly two forward passes"
    clean, second = out["seen"]
    # clean pass at w; its loss is the one returned
    for seen, w in zip(clean["weights"], w_before):
        assert torch.equal(seen, w)
    torch.testing.assert_close(out["loss"], ref["loss"], **tol)
    # perturbed point w' = w + g * (rho / (||g|| + 1e-12) - alpha), ||g|| without the scales
    for seen, expected in zip(second["weights"], ref["perturbed"]):
        torch.testing.assert_close(seen, expected, **tol)
    moved = [not torch.allclose(a, b, **tol) for a, b in zip(second["weights"],
                                                               ref["perturbed_if_scales_counted"])]
    assert any(moved), "test is blind: the scale gradients do not change ||g|| measurably"
    # scales are not perturbed: the second pass sees their original values
    for seen_clean, seen_second, s in zip(clean["scales"], second["scales"], s_before):
        assert torch.equal(seen_clean, s) and torch.equal(seen_second, s)
    # final weight gradient 0.5 * g + 0.5 * g_p
    for grad, g, g_p in zip(out["grads"], ref["g"], ref["g_p"]):
        torch.testing.assert_close(grad, 0.5 * g + 0.5 * g_p, **tol)
    # g_task / g_smooth: scale gradients of the clean and perturbed passes, kept apart
    assert out["g_task"].shape == out["g_smooth"].shape == (len(scales),)
    torch.testing.assert_close(out["g_task"], ref["g_task"], **tol)
    torch.testing.assert_close(out["g_smooth"], ref["g_smooth"], **tol)
    assert (ref["g_task"] != 0).all() and not torch.allclose(ref["g_task"], ref["g_smooth"])
    # exact restore of w, scales untouched by the step itself
    for w, before in zip(weights, w_before):
        assert torch.equal(w.detach(), before)
    for s, before in zip(scales, s_before):
        assert torch.equal(s.detach(), before)
    # BN statistics: moved by the clean pass only (num_batches_tracked included)
    after = bn_state(model)
    assert not torch.equal(ref["bn"]["running_mean"], bn_before["running_mean"])
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(ref["bn"][key], clean["bn"][key], **tol)
        assert torch.equal(after[key], clean["bn"][key]), key
        assert torch.equal(second["bn"]["running_mean"], clean["bn"]["running_mean"])
    assert int(after["num_batches_tracked"]) == int(bn_before["num_batches_tracked"]) + 1
    assert model.bn.momentum == bn_momentum


def test_sagm_step_clears_stale_gradients() -> None:
    """Gradients left over from earlier steps must not leak into either pass."""
    model, x, y = make_case(torch.float64, 0.1)
    weights, scales = split_params(model)
    ref = reference(model, x, y)
    for p in [*weights, *scales]:
        p.grad = torch.full_like(p, 3.0)
    out = run_sagm(model, x, y)
    for grad, g, g_p in zip(out["grads"], ref["g"], ref["g_p"]):
        torch.testing.assert_close(grad, 0.5 * g + 0.5 * g_p, **tolerance(torch.float64))
    torch.testing.assert_close(out["g_task"], ref["g_task"], **tolerance(torch.float64))


def test_frozen_bn_statistics_restores_on_error() -> None:
    """The BN context restores momentum and the batch counter even when the pass raises."""
    model, x, _ = make_case(torch.float32, 0.1)
    before = bn_state(model)
    with pytest.raises(RuntimeError, match="boom"), frozen_bn_statistics(model):
        model(x)
        raise RuntimeError("boom")
    assert model.bn.momentum == 0.1
    for key, value in bn_state(model).items():
        assert torch.equal(value, before[key]), key


def test_unused_parameters_and_no_scales() -> None:
    """A weight and a scale the loss does not reach get zero gradients (not None); without
    scales (full-precision SAGM) both scale gradients are empty. The step still matches the
    reference on the weights the loss reaches."""
    model, x, y = make_case(torch.float64, None)
    weights, scales = split_params(model)
    unused_w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    unused_s = nn.Parameter(torch.ones((), dtype=torch.float64))
    ref = reference(model, x, y)
    loss, g_task, g_smooth = sagm_step(lambda: F.cross_entropy(model(x), y), model,
                                       [*weights, unused_w], [*scales, unused_s], RHO, ALPHA)
    assert torch.equal(unused_w.grad, torch.zeros(3, dtype=torch.float64))
    assert g_task[-1] == 0 and g_smooth[-1] == 0 and g_task.shape == (3,)
    torch.testing.assert_close(g_task[:2], ref["g_task"], **tolerance(torch.float64))
    torch.testing.assert_close(g_smooth[:2], ref["g_smooth"], **tolerance(torch.float64))

    fp = nn.Linear(4, 2).double()
    data, target = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    _, g_task, g_smooth = sagm_step(lambda: F.cross_entropy(fp(data), target), fp,
                                    list(fp.parameters()), [], RHO, ALPHA)
    assert g_task.shape == g_smooth.shape == (0,)
