"""SWAD (Cha et al. 2021): the loss-valley rule on scripted loss sequences (worked out by hand
below, and against the official code transcribed in :mod:`references`), the averages it builds,
its state through weights-only checkpoints, the plugin's SWAD algorithms and ``gaqat train``."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from domainbed import algorithms as db_algorithms
from hypothesis import given, settings
from hypothesis import strategies as st
from support.helpers import PYTHON, run, subprocess_env, tiny_hparams
from support.references import loss_valley_reference

from domainbed_gaqat.optim.swad import SWAD, LossValley, WeightAverage
from domainbed_gaqat.plugin.hooks import hosted
from domainbed_gaqat.plugin.model_files import algorithm_from_checkpoint, load_checkpoint
from domainbed_gaqat.quant.modules import quantizers

# --- the loss valley on scripted losses --------------------------------------------------------

# Evaluation i hands segment s_i with loss LOSSES[i] (n_converge 3, n_tolerance 6, ratio 0.3).
# A: the last three losses' oldest is their least first at i = 6 ([5, 6, 6]: converged at s4);
#    threshold mean(5, 6, 6) * 1.3 = 7.367; of the window's four oldest [s1..s4] = [9, 8, 7, 5]
#    the last above it is s2, so the average starts two later: s4. Evaluations 7, 8: the
#    window's oldest (s2, s3) precede s4, nothing; 9: s4 again (the least of [s4..s9] is 5);
#    10..15: s5..s10 (the least of each window <= 7.367); 16: [s11..s16] all 9: dead.
A = [10, 9, 8, 7, 5, 6, 6, 5.5, 5.25, 6.5, 7, 9, 9, 9, 9, 9, 9]
A_TERMS = [4, 4, 5, 6, 7, 8, 9, 10]
# B: A up to evaluation 12 (terms 4, 4, 5, 6, 7), then the end: the window [s7..s12] loses its
#    oldest, and s8 (least of [s8..s12] 5.25), s9 (6.5), s10 (7) join; [s11, s12] = 9: stop.
B = A[:13]
B_TERMS = [4, 4, 5, 6, 7, 8, 9, 10]
# C: never converges (the losses fall): the final model is the last segment.
C = [5, 4, 3, 2, 1]
# D: converges at the third evaluation (s0, threshold 2 * 1.3 = 2.6) with a window of three:
#    [s0, s1, s2]'s last above 2.6 is s2, so nothing is added (the average is a copy of s0
#    counted zero times); 3, 4, 5: the window is not full, its oldest s0 is added each time;
#    6: s1; the end: s1 leaves, s2 (3.0, above the threshold, but the least of [s2..s6] is
#    1.25) to s6 join.
D = [1, 2, 3, 2.5, 2, 1.5, 1.25]
D_TERMS = [0, 0, 0, 1, 2, 3, 4, 5, 6]
# E: converges at 6 on s4 (threshold 2.65 * 1.3 = 3.445); no loss of [s1..s4] is above it, so
#    the average starts at s2 (the window's oldest, s1, never counts): s2, s3, s4; the end: s1
#    leaves the window, s2..s6 join.
E = [3, 2.875, 2.75, 2.625, 2.5, 2.625, 2.75]
E_TERMS = [2, 3, 4, 2, 3, 4, 5, 6]
CASES = {"A": (A, 4, 16, A_TERMS), "B": (B, 4, None, B_TERMS), "C": (C, None, None, [4]),
         "D": (D, 0, None, D_TERMS), "E": (E, 4, None, E_TERMS)}


def one_hot_segments(n: int) -> list[WeightAverage]:
    """Segment i: the one-hot vector e_i (so an average tells how often each segment counts),
    ending at step 10 * i."""
    return [WeightAverage([torch.eye(n, dtype=torch.float64)[i]], 1, 10 * i, 10 * i)
            for i in range(n)]


def run_valley(losses: list[float], n_converge: int = 3, n_tolerance: int = 6,
               ratio: float = 0.3) -> tuple[LossValley, int | None, WeightAverage | None]:
    valley, dead_at = LossValley(n_converge, n_tolerance, ratio), None
    for i, segment in enumerate(one_hot_segments(len(losses))):
        segment.loss = losses[i]
        valley.update(segment)
        if valley.dead:
            dead_at = i
            break
    return valley, dead_at, valley.final()


def mean_of(terms: list[int], n: int) -> torch.Tensor:
    counts = torch.zeros(n, dtype=torch.float64)
    for t in terms:
        counts[t] += 1
    return counts / len(terms)


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_valley_on_scripted_losses(case: str) -> None:
    losses, converged_on, dead_at, terms = CASES[case]
    valley, died, final = run_valley(losses)
    assert died == dead_at
    assert valley.converge_step == (None if converged_on is None else 10 * converged_on)
    assert torch.allclose(final.tensors[0], mean_of(terms, len(losses)), atol=1e-12)
    assert final.count == (len(terms) if converged_on is not None else 1)
    if converged_on is not None:
        assert final.end_step == 10 * terms[-1]
    assert loss_valley_reference(losses, 3, 6, 0.3) == {
        "converged": converged_on, "dead": dead_at, "terms": terms}


LOSS = st.integers(1, 40).map(lambda k: k / 8)  # exact binary fractions: exact thresholds


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(LOSS, min_size=1, max_size=30), st.integers(1, 5), st.integers(1, 8),
       st.sampled_from([0.0, 0.3, 1.0]))
def test_loss_valley_equals_the_official_rule(losses, n_converge, n_tolerance, ratio) -> None:
    """Random loss sequences and window sizes (n_tolerance below, equal to and above
    n_converge) against the official code transcribed onto segment indices."""
    valley, died, final = run_valley(losses, n_converge, n_tolerance, ratio)
    want = loss_valley_reference(losses, n_converge, n_tolerance, ratio)
    assert died == want["dead"]
    assert valley.converge_step == (None if want["converged"] is None
                                    else 10 * want["converged"])
    assert torch.allclose(final.tensors[0], mean_of(want["terms"], len(losses)), atol=1e-12)


def test_loss_valley_checks_its_settings() -> None:
    with pytest.raises(ValueError, match="n_converge 0: expected an integer >= 1"):
        LossValley(0, 6, 0.3)
    with pytest.raises(ValueError, match="tolerance_ratio -0.1: expected a number >= 0"):
        LossValley(3, 6, -0.1)


# --- averages of a toy model's iterates --------------------------------------------------------


def toy_run(swad: SWAD, steps: range, losses: dict[int, float], freq: int = 2) -> None:
    """The iterate after step t is ``[t, -2t]`` (float32); evaluations at multiples of
    ``freq`` hand ``losses[t]``."""
    for t in steps:
        swad.observe([torch.tensor(float(t)), torch.tensor([-2.0 * t])])
        if t % freq == 0:
            swad.evaluated(losses[t])


def test_the_average_is_the_hand_computed_mean_of_iterates() -> None:
    """Evaluations every 2 steps: segment 0 is step 0, segment k >= 1 steps 2k-1 and 2k (mean
    2k - 1/2). Losses E: the average is segments 2, 3, 4 twice and 5, 6 once (see E above):
    (2 * (3.5 + 5.5 + 7.5) + 9.5 + 11.5) / 8 = 6.75."""
    swad = SWAD()
    toy_run(swad, range(13), {2 * k: loss for k, loss in enumerate(E)})
    final = swad.final()
    assert final.tensors[0].item() == pytest.approx(6.75, rel=1e-6)
    assert final.tensors[1].item() == pytest.approx(-13.5, rel=1e-6)
    assert (final.count, final.end_step) == (8, 12)


def test_restart_forgets_the_averages_but_not_the_step() -> None:
    swad = SWAD(n_converge=1, n_tolerance=1)
    toy_run(swad, range(5), {t: 1.0 for t in range(0, 20, 2)})
    swad.restart()
    toy_run(swad, range(5, 9), {t: 1.0 for t in range(0, 20, 2)})
    # n_converge 1: converged on the first segment after the restart, steps 5-6; with a window
    # of one, the next evaluation's segment (steps 7-8, mean 7.5) overwrites its uncounted copy
    assert swad.valley.converge_step == 6 and swad.steps == 9
    final = swad.final()
    assert (final.tensors[0].item(), final.count, final.start_step) == (7.5, 1, 7)


def test_state_round_trips_through_a_weights_only_file(tmp_path) -> None:
    """Saved mid-valley (a window, a converged average, a running segment) and loaded into a
    new SWAD: the same final average, bit for bit, as the uninterrupted one."""
    losses = {2 * k: loss for k, loss in enumerate(A)}
    whole = SWAD()
    toy_run(whole, range(27), losses)
    part = SWAD()
    toy_run(part, range(17), losses)  # converged at evaluation 6 (step 12), mid-segment at 16
    torch.save(part.state_dict(), tmp_path / "swad.pt")
    resumed = SWAD()
    resumed.load_state_dict(torch.load(tmp_path / "swad.pt", weights_only=True), strict=True)
    toy_run(resumed, range(17, 27), losses)
    for a, b in zip(whole.final().tensors, resumed.final().tensors):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="settings"):
        SWAD(n_converge=2).load_state_dict(part.state_dict())


# --- the plugin's algorithms -------------------------------------------------------------------

SHAPE, CLASSES, DOMAINS = (3, 32, 32), 10, 5


def batch(seed: int, size: int = 2) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *SHAPE, generator=g),
             torch.randint(0, CLASSES, (size,), generator=g)) for _ in range(DOMAINS)]


def build(name: str, **overrides):
    torch.manual_seed(0)
    with hosted():
        return db_algorithms.get_algorithm_class(name)(SHAPE, CLASSES, DOMAINS,
                                                       tiny_hparams(name, batch_size=2,
                                                                    **overrides))


def test_swad_refuses_outside_gaqat_train() -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="SWAD_LSQ needs the training-loop hooks of "
                                         "`gaqat train`"):
        db_algorithms.SWAD_LSQ(SHAPE, CLASSES, DOMAINS, tiny_hparams("SWAD_LSQ"))


@pytest.mark.parametrize("name", ["SWAD_FP", "SWAD_LSQ"])
def test_the_algorithm_ends_with_the_averaged_iterates(name: str, tmp_path) -> None:
    """Steps 0..6, evaluated every 2 steps with losses D (converged on the first segment): the
    parameters at the end are the mean of the iterates the rule picks (by hand from the
    recorded iterates), and a model.pkl of the result rebuilds with the averaged weights."""
    algorithm = build(name)
    iterates, losses = [], {2 * k: loss for k, loss in enumerate(D)}
    for t in range(13):
        algorithm.update(batch(t))
        iterates.append([p.detach().clone() for p in algorithm.parameters()])
        if t % 2 == 0:
            assert not algorithm.on_checkpoint(t, losses[t])
    segments = [[0]] + [[2 * k - 1, 2 * k] for k in range(1, 7)]
    weights = {s: 0.0 for s in range(13)}  # the mean of the terms' segment means
    for term in D_TERMS:
        for s in segments[term]:
            weights[s] += 1 / (len(D_TERMS) * len(segments[term]))
    algorithm.on_train_end(iter(()))
    assert algorithm.extra_models() == {"swad": algorithm}
    for i, p in enumerate(algorithm.parameters()):
        expected = sum(w * iterates[s][i].double() for s, w in weights.items())
        assert torch.allclose(p.double(), expected, rtol=1e-5, atol=1e-6), i
    ckpt = {"args": {"algorithm": name}, "model_input_shape": SHAPE,
            "model_num_classes": CLASSES, "model_num_domains": DOMAINS,
            "model_hparams": algorithm.hparams, "model_dict": algorithm.state_dict()}
    torch.save(ckpt, tmp_path / "model.pkl")
    rebuilt = algorithm_from_checkpoint(load_checkpoint(str(tmp_path / "model.pkl")))
    algorithm.eval()
    x = batch(99)[0][0]
    with torch.no_grad():
        assert torch.equal(rebuilt.predict(x), algorithm.predict(x))


def test_swad_qtdog_restarts_when_quantization_starts() -> None:
    """QT-DoG's release restarts SWAD at ``q_steps``: with n_converge 1 the first segment after
    the start converges at once, and no full-precision iterate is in the final average."""
    algorithm = build("SWAD_QTDoG", quant_start=3, swad_n_converge=1, swad_n_tolerance=2)
    iterates = []
    for t in range(7):
        algorithm.update(batch(t))
        iterates.append([p.detach().clone() for p in algorithm.parameters()])
        algorithm.on_checkpoint(t, 1.0)  # every step evaluated: segments of one step
    assert algorithm.swad.valley.converge_step == 3
    assert all(bool(q.enabled) for _, q in quantizers(algorithm))
    algorithm.on_train_end(iter(()))
    terms = loss_valley_reference([1.0] * 4, 1, 2, 0.3)["terms"]  # the 4 segments from step 3
    for i, p in enumerate(algorithm.parameters()):
        expected = sum(iterates[3 + t][i].double() for t in terms) / len(terms)
        assert torch.allclose(p.double(), expected, rtol=1e-5, atol=1e-6), i


def test_a_dead_valley_stops_the_run() -> None:
    algorithm = build("SWAD_FP")
    stops = []
    for t, loss in enumerate(A):
        algorithm.update(batch(t))
        stops.append(algorithm.on_checkpoint(t, loss))
    assert stops == [False] * 16 + [True]


# --- through the real scripts ------------------------------------------------------------------


@pytest.mark.slow
def test_domainbeds_train_refuses_swad(tmp_path) -> None:
    proc = run([PYTHON, "-m", "domainbed.scripts.train", "--dataset", "RotatedDigits",
                "--algorithm", "SWAD_LSQ", "--test_envs", "0", "--steps", "2",
                "--output_dir", str(tmp_path / "out")], check=False, timeout=600)
    assert proc.returncode != 0
    # train.py tees stderr into err.txt and (its Tee's "stdout") the process's stdout
    message = "ValueError: SWAD_LSQ needs the training-loop hooks of `gaqat train`"
    assert message in (tmp_path / "out" / "err.txt").read_text() and message in proc.stdout
    assert not (tmp_path / "out" / "results.jsonl").exists()


# a window of three from the first evaluation on (n_converge 1): the valley's state matters
SWAD_ARGS = ["--dataset", "RotatedDigits", "--test_envs", "0", "--steps", "14",
             "--checkpoint_freq", "2", "--seed", "1", "--algorithm", "SWAD_LSQ", "--hparams",
             json.dumps({"batch_size": 8, "swad_n_converge": 1, "swad_n_tolerance": 3,
                         "swad_tolerance_ratio": 1.0})]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _records(out: Path) -> list[dict]:
    found = []
    for line in (out / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("step_time")
        record["args"].pop("output_dir")
        found.append(record)
    return found


@pytest.mark.slow
def test_swad_through_gaqat_train_resumes_exactly(tmp_path) -> None:
    """An uninterrupted run and one stopped by SIGTERM after its second record, then rerun:
    the same records (the SWAD accuracies in the last) and the same averaged model.pkl."""
    whole = tmp_path / "whole"
    run([PYTHON, "-m", "domainbed_gaqat.train", *SWAD_ARGS, "--output_dir", str(whole)],
        timeout=900, **ENV)
    stopped = tmp_path / "stopped"
    command = [PYTHON, "-m", "domainbed_gaqat.train", *SWAD_ARGS, "--output_dir", str(stopped)]
    proc = subprocess.Popen(command, env=subprocess_env(**ENV), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, results = time.time() + 600, stopped / "results.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 128 + signal.SIGTERM
    saved = torch.load(stopped / "resume.pt", weights_only=True)
    valley = saved["algorithm"]["swad._extra_state"]["valley"]
    assert valley["converge_step"] == 0 and valley["segments"]  # mid-valley
    run(command, timeout=900, **ENV)
    assert _records(stopped) == _records(whole)
    last = _records(whole)[-1]
    assert last["step"] == 13 and {f"swad_env{i}_{s}_acc" for i in range(6)
                                   for s in ("in", "out")} <= set(last)
    mine, reference = (torch.load(d / "model.pkl", weights_only=True) for d in (stopped, whole))
    for key, value in reference["model_dict"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(mine["model_dict"][key], value), key
    # the model.pkl predicts with the averaged weights: its accuracies are the SWAD ones
    model = algorithm_from_checkpoint(reference)
    assert model.swad.valley.converge_step is None  # finished: the window is not kept
