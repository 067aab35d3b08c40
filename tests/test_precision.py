"""State dtypes under bf16: quantizer scales, their gradients and GAQAT's freezing state stay
float32, and counters integers, whether the model around them is cast to bf16 or runs under
bf16 autocast; the quantizer computes in float32 both ways (forward and backward).

References: ``tests/support/references.py`` (numpy, float64 sums, the quotient rounded to
float32 as the kernel computes it) and the brute-force schedule of Algorithm 1
(``test_freezing.py``)."""

import numpy as np
import pytest
import torch
from support.references import integer_grid, lsq_forward, lsq_grads

from domainbed_gaqat import bench, cli
from domainbed_gaqat.quant.lsq import lsq_quantize
from domainbed_gaqat.quant.modules import quantizers

BF16 = torch.bfloat16


def quick_args():
    return bench.resolve(cli.command_parser("bench")[0].parse_args(["--quick"]))


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_under_bf16_autocast_computes_in_float32(signed):
    """A bf16 input and a float32 scale under CPU autocast: the output is the float32 LSQ
    value rounded to bf16, ``dL/dv`` the STE mask of the bf16 gradient (in bf16), ``dL/ds``
    float32 and equal to the reference from the same values (a bf16 ``round(x) - x`` would be
    off by about 1e-2 relative)."""
    lower, upper = integer_grid(4, signed)
    gen = torch.Generator().manual_seed(0)
    v = (torch.randn(4096, generator=gen) * 0.8).to(BF16)
    v = v if signed else v.abs()
    grad_out = torch.randn(4096, generator=gen).to(BF16)
    scale = torch.tensor(0.1234567, requires_grad=True)
    v_ = v.clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16, cache_enabled=False):
        out = lsq_quantize(v_, scale, lower, upper, grad_scale=0.01)
    out.backward(grad_out)
    v64, s64, go64 = (t.detach().double().numpy() for t in (v, scale, grad_out))
    want = lsq_forward(v64, s64, lower, upper, dtype=np.float32)
    grad_v, grad_s = lsq_grads(v64, s64, lower, upper, go64, 0.01, dtype=np.float32)
    assert out.dtype == BF16 and torch.equal(out, torch.from_numpy(want).to(BF16))
    assert v_.grad.dtype == BF16 and torch.equal(v_.grad, torch.from_numpy(grad_v).to(BF16))
    assert scale.grad.dtype == torch.float32
    assert scale.grad.item() == pytest.approx(grad_s, rel=1e-5)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
def test_a_model_cast_to_bf16_keeps_its_quantization_state_float32(device):
    """``GAQAT.to(torch.bfloat16)``: weights bf16; scales, their gradients and Adam moments,
    the disorder state float32; counters and flags integers / booleans; it trains (a K
    boundary included) on bf16 inputs."""
    device = torch.device(device)
    alg = bench.build("GAQAT", quick_args(), device, **bench.SYNC_HPARAMS)
    alg.to(BF16)
    assert {p.dtype for p in alg.weights} == {BF16}
    assert {s.dtype for s in alg.scales} == {torch.float32}
    tracker = alg.freezer.tracker
    assert (tracker.flips.dtype, tracker.step.dtype, alg.freezer.frozen.dtype) == (
        torch.long, torch.long, torch.bool)
    assert tracker.disorder.dtype == tracker.prev_sign.dtype == torch.float32
    batch = [(x.to(BF16), y) for x, y in bench.make_batch(quick_args(), device)]
    for _ in range(3):
        stats = alg.update(batch)
        assert all(np.isfinite(v) for v in stats.values())
    assert int(tracker.step) == 3
    assert {s.grad.dtype for s in alg.scales} == {torch.float32}
    assert {alg.optimizer.state[s]["exp_avg"].dtype for s in alg.scales} == {torch.float32}
    assert all(bool(q.initialized) for _, q in quantizers(alg))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_step_keeps_scale_gradients_float32(device):
    """Under bf16 autocast (the weight-cast cache off, as SAGM needs) a GAQAT step gives the
    scales float32 gradients and leaves every parameter float32."""
    args, device = quick_args(), torch.device(device)
    alg = bench.build("GAQAT", args, device)
    batch = bench.make_batch(args, device)
    grads = []
    alg.register_scale_gradient_hook(grads.append)
    with torch.autocast(device.type, dtype=BF16, cache_enabled=False):
        stats = alg.update(batch)
    assert np.isfinite(stats["loss"])
    assert {grads[0].task.dtype, grads[0].smooth.dtype, grads[0].applied.dtype} == {
        torch.float32}
    assert {p.dtype for p in alg.parameters()} == {torch.float32}
