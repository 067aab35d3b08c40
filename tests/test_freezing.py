"""Gradient disorder (paper Definition 3.1) and selective freezing (Algorithm 1, sec. 3.3).

Every check compares against :func:`references.schedule_reference`, a brute-force
transcription of the paper: at step ``t`` a scale's gradient is ``0.5 * g_smooth`` if frozen,
else ``0.5 * (g_task + g_smooth)``; then, when ``t mod K == 0`` and ``t > 0`` (the plugin's
design: at ``t = 0`` no ``K``-step window exists), the disorder of ``g_task`` over steps
``t-K+1..t`` decides the flags for the next ``K`` steps.
"""

import copy
import io
from fractions import Fraction

import pytest
import torch
from support.helpers import tiny_hparams
from support.references import disorder_reference, schedule_reference

from domainbed_gaqat.optim.freezing import DisorderTracker, ScaleFreezer, freeze_decision

# --- running the implementation ---------------------------------------------------------------


def run_freezer(freezer: ScaleFreezer, g_task: list[list[float]],
                g_smooth: list[list[float]]) -> dict[str, list]:
    out: dict[str, list] = {"grad": [], "frozen": [], "disorder": []}
    for gt, gs in zip(g_task, g_smooth):
        grad = freezer.combine(torch.tensor(gt), torch.tensor(gs))
        out["grad"].append(grad.tolist())
        out["frozen"].append(freezer.frozen.tolist())
        out["disorder"].append(freezer.tracker.disorder.tolist())
    return out


def assert_same_schedule(got: dict[str, list], expected: dict[str, list]) -> None:
    assert got["frozen"] == expected["frozen"]
    assert got["grad"] == expected["grad"]  # values are exact multiples of 1/8
    for t, (d_got, d_exp) in enumerate(zip(got["disorder"], expected["disorder"])):
        assert d_got == pytest.approx([float(d) for d in d_exp], abs=1e-7), f"step {t}"


def regime_sequence(n: int, n_steps: int, K: int, seed: int) -> list[list[float]]:
    """Per scale and window, a random flip probability (0, 1, or in between): values in
    {-2, ..., 2} / 4, zeros included, so disorder ranges over the whole [0, (K-1)/K]."""
    gen = torch.Generator().manual_seed(seed)
    seq = torch.empty(n_steps, n)
    for i in range(n):
        sign = 1.0
        for t in range(n_steps):
            if t % K == 0:
                p_flip = [0.0, 1.0, 0.1, 0.5][int(torch.randint(4, (1,), generator=gen))]
            if torch.rand((), generator=gen) < p_flip:
                sign = -sign
            magnitude = int(torch.randint(0, 3, (1,), generator=gen)) / 4  # 0 is sgn(0) = 0
            seq[t, i] = sign * magnitude
    return seq.tolist()


def smooth_sequence(n: int, n_steps: int, seed: int) -> list[list[float]]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-8, 9, (n_steps, n), generator=gen) / 8).tolist()


# --- disorder ---------------------------------------------------------------------------------


def test_reference_disorder_definition() -> None:
    """The brute-force reference itself on the extreme cases of Definition 3.1."""
    K = 6
    assert disorder_reference([1.0] * K) == 0
    assert disorder_reference([(-1.0) ** j for j in range(K)]) == Fraction(K - 1, K)
    assert disorder_reference([0.0, 1.0, 0.0, 0.0, -1.0, -2.0]) == Fraction(3, K)


@pytest.mark.parametrize("K", [2, 3, 5])
def test_disorder_on_hand_made_sequences(K: int) -> None:
    """No flips, all flips, zeros, a flip across a window boundary, several scales at once and
    several windows: ``tracker.disorder`` equals Definition 3.1 after every closed window."""
    n_windows = 4
    steps = n_windows * K + 2  # steps 0..n_windows*K closes n_windows windows, then 1 more
    columns = [
        [1.0] * steps,  # never flips
        [(-1.0) ** t for t in range(steps)],  # flips every step
        [0.0] * steps,  # sgn(0) == sgn(0): no flip
        [0.0 if t % 2 else 0.5 for t in range(steps)],  # 0 vs +: every step flips
        # one sign change, between the last step of window 1 (t = K) and window 2's first
        [1.0 if t <= K else -1.0 for t in range(steps)],
        [-0.25 if t % 3 == 0 else 0.0 if t % 3 == 1 else 2.0 for t in range(steps)],
    ]
    seq = [list(row) for row in zip(*columns)]
    tracker = DisorderTracker(len(columns), K)
    closed = []
    for t, g in enumerate(seq):
        if tracker.observe(torch.tensor(g)):
            closed.append(t)
            expected = [float(disorder_reference([seq[j][i] for j in range(t - K + 1, t + 1)]))
                        for i in range(len(columns))]
            assert tracker.disorder.tolist() == pytest.approx(expected, abs=1e-7), t
    assert closed == [t for t in range(1, steps) if t % K == 0]
    assert int(tracker.step) == steps
    # column 4's only flip (steps K -> K+1) lies between two windows: both have disorder 0
    assert tracker.disorder[4] == 0


def test_disorder_random_sequences_many_scales() -> None:
    K, n, steps = 7, 12, 7 * 6 + 3
    seq = regime_sequence(n, steps, K, seed=1)
    got = run_freezer(ScaleFreezer(n, K, r=0.3), seq, smooth_sequence(n, steps, 2))
    expected = schedule_reference(seq, smooth_sequence(n, steps, 2), K, 0.3, "gaqat")
    assert_same_schedule(got, expected)
    disorders = {d for row in expected["disorder"] for d in row}
    assert Fraction(0) in disorders and Fraction(K - 1, K) in disorders


# --- the freezing rule -------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["gaqat", "reverse", "no_unfreeze"])
@pytest.mark.parametrize("K,r", [(4, 0.3), (5, 0.2), (3, 0.34)])
def test_schedule_matches_algorithm_1(rule: str, K: int, r: float) -> None:
    """Applied gradients (0.5*g_smooth frozen, 0.5*(g_task+g_smooth) unfrozen), flags and
    disorder at every step follow Algorithm 1 / Table 4; flags change only at t mod K == 0."""
    n, steps = 10, 8 * K + 1
    g_task, g_smooth = regime_sequence(n, steps, K, seed=K), smooth_sequence(n, steps, K + 100)
    got = run_freezer(ScaleFreezer(n, K, r, rule), g_task, g_smooth)
    assert_same_schedule(got, schedule_reference(g_task, g_smooth, K, r, rule))
    changes = [t for t in range(1, steps) if got["frozen"][t] != got["frozen"][t - 1]]
    assert changes, "test is blind: the flags never changed"
    assert all(t % K == 0 for t in changes), changes
    assert got["frozen"][K - 1] == [False] * n, "all scales start unfrozen"
    frozen_grads = [(t, i) for t in range(1, steps) for i in range(n)
                    if got["frozen"][t - 1][i] and g_task[t][i] != 0]
    assert frozen_grads, "test is blind: no frozen scale with a non-zero task gradient"
    for t, i in frozen_grads:
        assert got["grad"][t][i] == 0.5 * g_smooth[t][i]


def test_ablation_rules_relations() -> None:
    """Reverse Ratio freezes exactly the complement of GAQAT; w/o Unfreeze never unfreezes and
    keeps frozen what GAQAT would unfreeze."""
    n, K, steps, r = 16, 4, 4 * 10 + 1, 0.3
    g_task, g_smooth = regime_sequence(n, steps, K, seed=5), smooth_sequence(n, steps, 6)
    runs = {rule: run_freezer(ScaleFreezer(n, K, r, rule), g_task, g_smooth)
            for rule in ("gaqat", "reverse", "no_unfreeze")}
    for t in range(K, steps):
        assert runs["reverse"]["frozen"][t] == [not f for f in runs["gaqat"]["frozen"][t]]
        assert all(f or not g for f, g in zip(runs["no_unfreeze"]["frozen"][t],
                                              runs["gaqat"]["frozen"][t]))
        assert all(now or not before for now, before in zip(runs["no_unfreeze"]["frozen"][t],
                                                            runs["no_unfreeze"]["frozen"][t - 1]))
    assert runs["no_unfreeze"]["frozen"] != runs["gaqat"]["frozen"], "test is blind"


def test_freeze_decision_strict_threshold() -> None:
    """``delta < r`` freezes, ``delta == r`` does not (Algorithm 1, line 13)."""
    disorder = torch.tensor([0.0, 0.25, 0.5, 0.75])
    none = torch.zeros(4, dtype=torch.bool)
    assert freeze_decision(disorder, none, 0.5, "gaqat").tolist() == [True, True, False, False]
    assert freeze_decision(disorder, none, 0.5, "reverse").tolist() == [False, False, True, True]
    was = torch.tensor([False, False, True, False])
    assert freeze_decision(disorder, was, 0.5, "no_unfreeze").tolist() == [True, True, True,
                                                                           False]


@pytest.mark.parametrize("K", [0, 1, -3, 2.5, "10", None])
def test_bad_window_raises(K: object) -> None:
    with pytest.raises(ValueError, match="K"):
        DisorderTracker(3, K)
    with pytest.raises(ValueError, match="K"):
        ScaleFreezer(3, K, 0.3)


def test_bad_rule_raises() -> None:
    with pytest.raises(ValueError, match="rule 'sometimes'"):
        ScaleFreezer(3, 4, 0.3, rule="sometimes")
    with pytest.raises(ValueError, match="rule 'sometimes'"):
        freeze_decision(torch.zeros(3), torch.zeros(3, dtype=torch.bool), 0.3, "sometimes")


@pytest.mark.parametrize("rule", ["gaqat", "no_unfreeze"])
@pytest.mark.parametrize("stop", [1, 3, 4, 5, 9, 14])
def test_state_dict_round_trip_resumes_exactly(rule: str, stop: int) -> None:
    """Saved after ``stop`` steps (mid-window or at a boundary), loaded into a fresh freezer
    (``strict=True``, through ``torch.save``/``torch.load(weights_only=True)``), the rest of a
    long sequence gives the same flags, disorder and gradients as an uninterrupted run."""
    n, K, steps, r = 9, 4, 4 * 9 + 2, 0.3
    g_task, g_smooth = regime_sequence(n, steps, K, seed=11), smooth_sequence(n, steps, 12)
    whole = run_freezer(ScaleFreezer(n, K, r, rule), g_task, g_smooth)
    first = ScaleFreezer(n, K, r, rule)
    run_freezer(first, g_task[:stop], g_smooth[:stop])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = ScaleFreezer(n, K, r, rule)
    resumed.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    rest = run_freezer(resumed, g_task[stop:], g_smooth[stop:])
    for key in ("frozen", "grad", "disorder"):
        assert rest[key] == whole[key][stop:], key
    assert int(resumed.tracker.step) == steps


def test_step_counter_is_exact_at_any_step() -> None:
    """Resumed at step 2^24 + 1 (beyond float32's integers), windows still close at
    ``t mod K == 0``: the counter is an integer buffer."""
    K, start = 3, 2**24 + 1
    tracker = DisorderTracker(2, K)
    state = tracker.state_dict()
    state["step"] = torch.tensor(start)
    tracker.load_state_dict(state, strict=True)
    closed = [tracker.observe(torch.tensor([1.0, -1.0])) for _ in range(4)]
    assert closed == [(start + i) % K == 0 for i in range(4)] == [False, True, False, False]
    assert int(tracker.step) == start + 4


def test_flips_count_beyond_256_in_a_freezer_cast_to_bf16() -> None:
    """A freezer cast to bf16 (as ``model.to(torch.bfloat16)`` casts it) with DomainNet's
    K = 3000: a scale whose task gradient flips every step has disorder 2999/3000 at the first
    window and stays unfrozen (a bf16 counter stops at 256: disorder 0.085, frozen); one that
    flips every 10th step has 300/3000, one that never flips 0 (Algorithm 1's reference)."""
    K, r, steps = 3000, 0.25, 3001
    freezer = ScaleFreezer(3, K, r).to(torch.bfloat16)
    assert freezer.tracker.flips.dtype == torch.long
    assert freezer.tracker.disorder.dtype == freezer.tracker.prev_sign.dtype == torch.float32
    g_task = [[(-1.0) ** t, 0.5, (-1.0) ** (t // 10)] for t in range(steps)]
    g_smooth = [[0.25, 0.25, 0.25]] * steps
    got = run_freezer(freezer, g_task, g_smooth)
    expected = schedule_reference(g_task, g_smooth, K, r, "gaqat")
    assert expected["disorder"][-1] == [Fraction(2999, 3000), 0, Fraction(300, 3000)]
    assert got["frozen"][-1] == expected["frozen"][-1] == [False, True, True]
    assert got["disorder"][-1] == pytest.approx([float(d) for d in expected["disorder"][-1]],
                                                abs=1e-7)


# --- on a real GAQAT instance ----------------------------------------------------------------


def make_algorithm(name: str, seed: int = 0, **overrides):
    from domainbed import algorithms

    hparams = tiny_hparams(name, **overrides)
    torch.manual_seed(seed)
    return algorithms.get_algorithm_class(name)((3, 32, 32), 10, 2, hparams)


def batches(n_steps: int, seed: int = 0) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen))
             for _ in range(2)] for _ in range(n_steps)]


class Recorder:
    """Captures one instance's ``g_task``/``g_smooth`` and the scale gradients it applies, from
    its scale-gradient hook (right before its ``optimizer.step``)."""

    def __init__(self, algorithm) -> None:
        self.g_task: list[torch.Tensor] = []
        self.g_smooth: list[torch.Tensor] = []
        self.applied: list[torch.Tensor] = []
        self.handle = algorithm.register_scale_gradient_hook(self._record)

    def _record(self, grads) -> None:
        self.g_task.append(grads.task.clone())
        self.g_smooth.append(grads.smooth.clone())
        self.applied.append(grads.applied.clone())


def calibrate(algorithm, data) -> None:
    """Initialise the quantizer scales (MSE, lazily on the first forward) without a step."""
    with torch.no_grad():
        algorithm.predict(torch.cat([x for x, _ in data[0]]))


@pytest.fixture(scope="module")
def calibrated():
    """A calibrated GAQAT (K = 2, r = 0.3) that no step has touched, and its batches; tests
    take deep copies (the costly part is the MSE calibration)."""
    data = batches(6)
    algorithm = make_algorithm("GAQAT", gaqat_K=2, gaqat_r=0.3, batch_size=4)
    calibrate(algorithm, data)
    return algorithm, data


def test_gaqat_instance_follows_algorithm_1(calibrated, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real GAQAT: the scale gradients given to Adam, the flags and the disorder follow the
    reference schedule fed with the instance's own g_task/g_smooth; the update reports plain
    floats; Adam's first step moves each scale by about ``-scale_lr * sign(grad)``."""
    algorithm, data = copy.deepcopy(calibrated)
    K, r, steps = algorithm.hparams["gaqat_K"], algorithm.hparams["gaqat_r"], 5
    recorder = Recorder(algorithm)
    scales_before = torch.stack([s.detach().clone() for s in algorithm.scales])
    frozen, stats = [], []
    for t in range(steps):
        stats.append(algorithm.update(data[t]))
        frozen.append(algorithm.freezer.frozen.tolist())
        if t == 0:
            first_move = torch.stack([s.detach() for s in algorithm.scales]) - scales_before
    g_task = [g.tolist() for g in recorder.g_task]
    expected = schedule_reference(g_task, [g.tolist() for g in recorder.g_smooth], K, r, "gaqat")
    assert frozen == expected["frozen"]
    assert any(any(f) for f in frozen) and not all(all(f) for f in frozen[K:])
    for t in range(steps):
        flags = torch.tensor(frozen[t - 1] if t else [False] * len(algorithm.scales))
        combined = 0.5 * (recorder.g_smooth[t] + torch.where(flags, 0.0, recorder.g_task[t]))
        torch.testing.assert_close(recorder.applied[t], combined, rtol=0, atol=0)
        assert set(stats[t]) == {"loss", "frozen_frac", "disorder_mean"}
        assert all(type(v) is float for v in stats[t].values())
        assert stats[t]["frozen_frac"] == pytest.approx(sum(frozen[t]) / len(frozen[t]))
        assert stats[t]["disorder_mean"] == pytest.approx(
            float(sum(expected["disorder"][t]) / len(frozen[t])))
    lr = algorithm.hparams["scale_lr"]
    big = recorder.applied[0].abs() > 1e-5
    assert big.sum() > len(algorithm.scales) // 2
    torch.testing.assert_close(first_move[big], -lr * recorder.applied[0].sign()[big],
                               rtol=1e-2, atol=3e-7)


@pytest.mark.parametrize("name", ["GAQAT_ReverseRatio", "GAQAT_NoUnfreeze"])
def test_ablation_instances_follow_their_rule(calibrated, name: str) -> None:
    """The Table 4 ablations on a real model (GAQAT itself: above), 7 steps with K = 2
    (decisions at t = 2, 4, 6): flags and applied scale gradients at every step equal the
    brute-force schedule of the algorithm's rule fed with its own g_task / g_smooth, and
    differ from the other rules' schedules of the same gradients."""
    from domainbed import algorithms

    base, data = calibrated
    data = data + batches(1, seed=1)
    algorithm = algorithms.get_algorithm_class(name)((3, 32, 32), 10, 2, base.hparams)
    algorithm.load_state_dict(base.state_dict(), strict=True)
    rule = algorithm.FREEZE_RULE
    K, r, steps = base.hparams["gaqat_K"], base.hparams["gaqat_r"], 7
    recorder, frozen = Recorder(algorithm), []
    for t in range(steps):
        algorithm.update(data[t])
        frozen.append(algorithm.freezer.frozen.tolist())
    g_task = [g.tolist() for g in recorder.g_task]
    g_smooth = [g.tolist() for g in recorder.g_smooth]
    expected = schedule_reference(g_task, g_smooth, K, r, rule)
    assert frozen == expected["frozen"]
    for t in range(steps):
        assert recorder.applied[t].tolist() == pytest.approx(expected["grad"][t], rel=1e-6,
                                                             abs=1e-12), t
    assert len({tuple(f) for f in frozen[K:]}) > 1, "test is blind: one decision only"
    for other in {"gaqat", "reverse", "no_unfreeze"} - {rule}:
        assert schedule_reference(g_task, g_smooth, K, r, other)["frozen"] != frozen, other


def test_freezing_leaves_weights_alone(calibrated, monkeypatch: pytest.MonkeyPatch) -> None:
    """GAQAT with every scale frozen vs SAGM_LSQ from the same state and batch: identical latent
    weights after the step (freezing touches only the scale update), different scales; the
    frozen scales were given exactly 0.5 * g_smooth, SAGM_LSQ's 0.5 * (g_task + g_smooth)."""
    gaqat, data = copy.deepcopy(calibrated)
    gaqat.update(data[0])  # a non-trivial Adam state
    sagm = make_algorithm("SAGM_LSQ", seed=1, batch_size=4)
    result = sagm.load_state_dict(gaqat.state_dict(), strict=False)
    assert not result.missing_keys
    assert all(k.startswith("freezer.") for k in result.unexpected_keys)
    # deep copy: Optimizer.load_state_dict keeps the very tensors it is given
    sagm.optimizer.load_state_dict(copy.deepcopy(gaqat.optimizer.state_dict()))
    gaqat.freezer.frozen.fill_(True)
    recorder, sagm_recorder = Recorder(gaqat), Recorder(sagm)
    gaqat.update(data[1])
    sagm.update(data[1])
    assert torch.equal(recorder.applied[0], 0.5 * recorder.g_smooth[0])
    # SAGM_LSQ (Eq. 1): same two scale gradients, both applied
    assert torch.equal(sagm_recorder.g_task[0], recorder.g_task[0])
    assert torch.equal(sagm_recorder.g_smooth[0], recorder.g_smooth[0])
    assert torch.equal(sagm_recorder.applied[0],
                       0.5 * (recorder.g_task[0] + recorder.g_smooth[0]))
    for w_gaqat, w_sagm in zip(gaqat.weights, sagm.weights):
        assert torch.equal(w_gaqat, w_sagm)
    differ = [not torch.equal(a, b) for a, b in zip(gaqat.scales, sagm.scales)]
    assert sum(differ) > len(differ) // 2


def test_bad_window_from_hparams() -> None:
    with pytest.raises(ValueError, match="K"):
        make_algorithm("GAQAT", gaqat_K=1)
    with pytest.raises(ValueError, match="K"):
        make_algorithm("GAQAT_NoUnfreeze", gaqat_K=10.0)
