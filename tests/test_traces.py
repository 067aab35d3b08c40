"""Gradient traces (paper Figures 2-5): recorded sums and disorder against independent
references, tidy files and figures."""

import os

import numpy as np
import pandas as pd
import pytest
import torch
from support.helpers import gaqat, tiny_hparams
from support.inspect_fixtures import assert_png, lsq_w3

from domainbed_gaqat import traces
from domainbed_gaqat.plugin import model_files, registry
from domainbed_gaqat.plugin.data import Data
from domainbed_gaqat.quant.modules import quantizers

STEPS, EVERY, K = 4, 2, 2


def _reference_grads(ref, alg, minibatches) -> tuple[torch.Tensor, torch.Tensor]:
    """``g_task`` and ``g_smooth`` of the scales, recomputed from the SAGM step (paper Eq. 1) on a
    copy: clean pass; latent weights moved by ``g * (rho / ||g|| - alpha)``; perturbed pass."""
    ref.load_state_dict(alg.state_dict())
    ref.train()
    x = torch.cat([x for x, _ in minibatches])
    y = torch.cat([y for _, y in minibatches])
    for p in ref.parameters():
        p.grad = None
    ref.loss(x, y).backward()
    g_task = torch.stack([s.grad.clone() for s in ref.scales])
    g = [w.grad.clone() if w.grad is not None else torch.zeros_like(w) for w in ref.weights]
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in g)).float()
    step = ref.hparams["rho"] / (norm + 1e-12) - ref.hparams["alpha"]
    with torch.no_grad():
        for w, gw in zip(ref.weights, g):
            w.add_(gw * step)
    for p in ref.parameters():
        p.grad = None
    ref.loss(x, y).backward()
    g_smooth = torch.stack([s.grad.clone() for s in ref.scales])
    return g_task, g_smooth


def _disorder_reference(grads: np.ndarray, K: int) -> list[tuple[int, np.ndarray]]:
    """Definition 3.1 over windows of K gradients closing at 0-based steps K, 2K, ...
    (``t mod K == 0``, ``t > 0``): ``(1/K) * #sign changes inside the window``; returns
    ``(steps done, delta)`` per window."""
    out = []
    for t in range(K, len(grads), K):
        window = np.sign(grads[t - K + 1:t + 1])
        out.append((t + 1, (window[1:] != window[:-1]).sum(0) / K))
    return out


@pytest.fixture(scope="module")
def gaqat_trace(tmp_path_factory):
    """A recorded GAQAT run (K=2, r=0.3) with per-step references taken before each update."""
    torch.manual_seed(0)
    hparams = tiny_hparams("GAQAT", batch_size=2, gaqat_K=K, gaqat_r=0.3)
    data = Data("RotatedDigits", None, [0], hparams)
    stream = data.minibatches()
    cls = registry.algorithm_class("GAQAT")
    alg = cls(data.dataset.input_shape, data.dataset.num_classes, len(data.train_envs), hparams)
    ref = cls(data.dataset.input_shape, data.dataset.num_classes, len(data.train_envs), hparams)
    alg.update(next(stream))  # calibrates the quantizers on a first batch
    refs, applied = [], []
    hook = alg.optimizer.register_step_pre_hook(
        lambda opt, a, k: applied.append(torch.stack([s.grad.clone() for s in alg.scales])))

    def batches():
        for _ in range(STEPS):
            minibatches = next(stream)
            refs.append((alg.freezer.frozen.clone(), *_reference_grads(ref, alg, minibatches)))
            yield minibatches

    grads, disorder = traces.record_traces(alg, batches(), STEPS, EVERY, K, progress=False)
    hook.remove()
    frozen = torch.stack([r[0] for r in refs]).double()
    g_task = torch.stack([r[1] for r in refs]).double()
    g_smooth = torch.stack([r[2] for r in refs]).double()
    return {"alg": alg, "grads": grads, "disorder": disorder, "frozen": frozen,
            "g_task": g_task, "g_smooth": g_smooth, "applied": torch.stack(applied).double()}


def _blocks(per_step: torch.Tensor) -> np.ndarray:
    """Per-step values summed over blocks of EVERY steps (the last one may be shorter)."""
    return np.stack([per_step[i:i + EVERY].sum(0).numpy()
                     for i in range(0, len(per_step), EVERY)])


def _recorded(grads: pd.DataFrame, column: str, n: int) -> np.ndarray:
    return grads[column].to_numpy().reshape(-1, n)


def test_recorded_sums_equal_the_gradients_used(gaqat_trace) -> None:
    t = gaqat_trace
    n = len(t["alg"].scales)
    assert len(t["grads"]) == n * -(-STEPS // EVERY)
    assert list(t["grads"]["steps_in_block"].unique()) == [2]
    # the gradients the optimizer applied are Algorithm 1's combination of the references
    expected = 0.5 * (t["g_smooth"] + t["g_task"] * (1 - t["frozen"]))
    torch.testing.assert_close(t["applied"], expected, rtol=1e-4, atol=1e-10)
    for column, per_step, rtol in (("g_task", t["g_task"], 1e-5),
                                   ("g_smooth", t["g_smooth"], 1e-4),
                                   ("g_applied", t["applied"], 1e-6),
                                   ("frozen_steps", t["frozen"], 0)):
        np.testing.assert_allclose(_recorded(t["grads"], column, n), _blocks(per_step),
                                   rtol=rtol, atol=1e-10, err_msg=column)
    assert t["frozen"].sum() > 0, "no scale was frozen: the freezing path went untested"


def test_disorder_equals_definition(gaqat_trace) -> None:
    t = gaqat_trace
    n = len(t["alg"].scales)
    for stream in ("task", "smooth"):
        rows = t["disorder"][t["disorder"]["stream"] == stream]
        want = _disorder_reference(t[f"g_{stream}"].numpy(), K)
        assert sorted(rows["step"].unique()) == [s for s, _ in want]
        got = rows["disorder"].to_numpy().reshape(-1, n)
        np.testing.assert_array_equal(got, np.stack([d for _, d in want]))


def test_recorder_block_sums_and_windows_on_a_synthetic_stream() -> None:
    alg = registry.algorithm_class("GAQAT")((3, 32, 32), 10, 5, tiny_hparams("GAQAT"))
    n, steps, every, K = len(alg.scales), 11, 3, 4
    recorder = traces.TraceRecorder(alg, every, K)
    gen = torch.Generator().manual_seed(1)
    stream = {k: torch.randint(-1, 2, (steps, n), generator=gen).double()
              * torch.rand(steps, n, generator=gen, dtype=torch.float64)
              for k in ("task", "smooth", "applied")}
    frozen = torch.rand(steps, n, generator=gen) < 0.5
    for i in range(steps):
        recorder.observe(stream["task"][i].float(), stream["smooth"][i].float(),
                         stream["applied"][i].float(), frozen[i])
    recorder.close()
    assert "scale_grads" not in vars(alg) and not alg.optimizer._optimizer_step_pre_hooks
    grads, disorder = recorder.frames()
    sums = {k: np.stack([v[i:i + every].float().double().sum(0).numpy()
                         for i in range(0, steps, every)]) for k, v in stream.items()}
    np.testing.assert_allclose(_recorded(grads, "g_task", n), sums["task"], rtol=1e-6)
    np.testing.assert_allclose(_recorded(grads, "g_smooth", n), sums["smooth"], rtol=1e-6)
    np.testing.assert_allclose(_recorded(grads, "g_applied", n), sums["applied"], rtol=1e-6)
    assert list(grads["step"].unique()) == [3, 6, 9, 11]
    for name in ("task", "smooth"):
        want = _disorder_reference(stream[name].float().numpy(), K)
        rows = disorder[disorder["stream"] == name]
        assert list(rows["step"].unique()) == [5, 9] == [s for s, _ in want]
        np.testing.assert_array_equal(rows["disorder"].to_numpy().reshape(-1, n),
                                      np.stack([d for _, d in want]))
    labels = set(grads["label"])
    assert {"conv1 a", "layer3.0.conv1 w", "layer3.0.conv1 a"} <= labels
    assert set(grads["group"]) == set(traces.GROUPS)


def test_gaqat_tables_and_figures(gaqat_trace, tmp_path) -> None:
    t = gaqat_trace
    paths = traces.write_outputs(t["grads"], t["disorder"], str(tmp_path), "GAQAT test")
    names = {os.path.basename(p) for p in paths}
    assert {"grads.csv", "disorder.csv", "gradients.png", "disorder.png",
            "freezing.png"} <= names
    for name in ("gradients.png", "disorder.png", "freezing.png"):
        assert_png(str(tmp_path / name))
    back = pd.read_csv(tmp_path / "grads.csv")
    np.testing.assert_allclose(back["g_task"], t["grads"]["g_task"], rtol=1e-12)
    if (tmp_path / "grads.parquet").exists():
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "grads.parquet"), t["grads"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        traces.write_outputs(t["grads"], t["disorder"], str(tmp_path), "again")


def test_cli_lsq_run(tmp_path_factory) -> None:
    """LSQ has no smooth pass: only g_task (= the applied gradient), no freezing figure."""
    out = lsq_w3(tmp_path_factory)
    grads = pd.read_csv(os.path.join(out, "grads.csv"))
    disorder = pd.read_csv(os.path.join(out, "disorder.csv"))
    assert grads["g_smooth"].isna().all() and grads["frozen_steps"].isna().all()
    np.testing.assert_array_equal(grads["g_task"], grads["g_applied"])
    assert (grads["g_task"] != 0).any()
    assert list(grads["steps_in_block"].unique()) == [2, 1]
    assert set(disorder["stream"]) == {"task"}
    assert not os.path.exists(os.path.join(out, "freezing.png"))
    for name in ("gradients.png", "disorder.png"):
        assert_png(os.path.join(out, name))
    algorithm, ckpt = model_files.load_algorithm(os.path.join(out, "model.pkl"))
    assert ckpt["args"]["algorithm"] == "LSQ" and ckpt["model_hparams"]["w_bits"] == 3
    # the recorded scale values are those of the saved model
    last = grads[grads["step"] == grads["step"].max()]
    saved = {n: q.scale.item() for n, q in quantizers(algorithm)}
    np.testing.assert_allclose(last["scale"], [saved[n] for n in last["quantizer"]], rtol=1e-7)
    assert gaqat("traces", "--algorithm", "LSQ", "--steps", "1", "--output_dir", out) == 2


def test_unquantized_algorithm_is_a_clear_error() -> None:
    alg = registry.algorithm_class("ERM_FP")((3, 32, 32), 10, 5, tiny_hparams("ERM_FP"))
    with pytest.raises(ValueError, match="no quantizer scales"):
        traces.TraceRecorder(alg, 2, 2)
    with pytest.raises(ValueError, match="algorithm 'NOPE'"):
        registry.algorithm_class("NOPE")
