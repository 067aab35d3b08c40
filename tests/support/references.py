"""Independent references the tests compare the implementation against.

Written from the papers' formulas, not from the code under test: numpy in float64 for the
quantizer (and a plain-autograd torch transcription, to swap into whole models), exact
fractions for the gradient disorder, plain Python for model selection and the tables. Nothing
here imports ``domainbed_gaqat``.

- LSQ (Esser et al. 2019, eq. 1-3 and sec. 2.2; GAQAT paper sec. 2.1): fake quantization,
  its straight-through gradients and the gradient scale ``g = 1 / sqrt(N * Q_P)``.
- MSE range estimation (Nagel et al. 2021, sec. 3.4) by brute force over a candidate set.
- Gradient disorder (GAQAT Definition 3.1) and the freezing rule (Algorithm 1, Table 4).
- Test-domain / training-domain validation and the tables (DomainBed's protocol as
  ``experiments/selection.py`` states it, with its tie-break), the SWAD rows included.
- SWAD's ``LossValley`` (Cha et al. 2021), transcribed from its official code (``swad.py``,
  ``swa_utils.py``) onto segment indices.
"""

import math
import statistics
from collections import defaultdict, deque
from fractions import Fraction

import numpy as np
import torch

# --- LSQ -------------------------------------------------------------------------------------


def integer_grid(bits: int, signed: bool) -> tuple[int, int]:
    """``(l, u)``: ``[-2^(b-1), 2^(b-1) - 1]`` for weights (signed), ``[0, 2^b - 1]`` for
    activations (unsigned), GAQAT sec. 2.1; LSQ's ``(-Q_N, Q_P)``."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def round_half_even(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to the even integer (as IEEE 754's default rounding)."""
    floor = np.floor(x)
    frac = x - floor
    up = (frac > 0.5) | ((frac == 0.5) & (np.mod(floor, 2) == 1))
    return floor + up


def quotient(v: np.ndarray, s: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """``v / s`` as IEEE division in ``dtype`` computes it: the float64 quotient rounded to
    ``dtype`` (for float32 that is the correctly rounded float32 quotient)."""
    return (np.asarray(v, np.float64) / s).astype(dtype).astype(np.float64)


def lsq_forward(v: np.ndarray, s: np.ndarray, lower: int, upper: int,
                dtype: type = np.float64) -> np.ndarray:
    """LSQ eq. 1: ``v_hat = round(clip(v / s, -Q_N, Q_P)) * s`` (``s`` broadcasts), in
    ``dtype``."""
    x = quotient(v, s, dtype)
    return (round_half_even(np.clip(x, lower, upper)) * s).astype(dtype)


def lsq_grads(v: np.ndarray, s: np.ndarray, lower: int, upper: int, grad_out: np.ndarray,
              g: float, channel_axis: int | None = None,
              dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """``(dL/dv, dL/ds)`` of ``L = sum(grad_out * v_hat)``.

    ``dv_hat/dv = 1[l <= v/s <= u]`` (GAQAT sec. 2.1, closed range) and LSQ eq. 3,
    ``dv_hat/ds = round(v/s) - v/s`` inside, ``l`` below, ``u`` above the range, times the
    gradient scale ``g`` (sec. 2.2); ``dL/ds`` sums over the tensor, or over each slice along
    ``channel_axis``. On the bounds themselves (``v/s`` exactly ``l`` or ``u``) eq. 3 and the
    closed STE range disagree; the closed range is taken for both gradients, where
    ``round(x) - x = 0``, the limit from inside. ``x = v / s`` in ``dtype``; the sums in
    float64."""
    x = quotient(v, s, dtype)
    inside = (x >= lower) & (x <= upper)
    grad_v = np.where(inside, grad_out, 0.0)
    dq_ds = np.where(inside, round_half_even(x) - x, np.where(x < lower, lower, upper))
    terms = grad_out * dq_ds
    if channel_axis is None:
        grad_s = terms.sum()
    else:
        grad_s = np.moveaxis(terms, channel_axis, 0).reshape(terms.shape[channel_axis], -1)
        grad_s = grad_s.sum(axis=1)
    return grad_v, g * grad_s


def lsq_autograd(v: torch.Tensor, scale: torch.Tensor, lower: int, upper: int,
                 grad_scale: float = 1.0) -> torch.Tensor:
    """:func:`lsq_forward` and :func:`lsq_grads` by plain autograd: inside the closed range
    ``s * (x + stop_grad(round(x) - x))`` (``dv_hat/dv = 1``, ``dv_hat/ds = round(x) - x``),
    outside ``s * stop_grad(clip(x))`` (``0`` and ``l`` / ``u``); the gradient scale enters
    through ``stop_grad(s) + g * (s - stop_grad(s))``, whose value is exactly ``s``."""
    s = scale.detach() + (scale - scale.detach()) * grad_scale
    x = v / s
    inside = (x >= lower) & (x <= upper)
    return torch.where(inside, s * (x + (torch.round(x) - x).detach()),
                       s * x.detach().clamp(lower, upper))


def lsq_n(shape: tuple[int, ...], is_weight: bool, per_channel: bool = False) -> int:
    """LSQ sec. 2.2's ``N``: the number of weights a step size quantizes (per output channel:
    one channel's), or the number of features of one example of an activation."""
    if is_weight:
        return math.prod(shape[1:]) if per_channel else math.prod(shape)
    return math.prod(shape[1:])


def lsq_gradient_scale(n: int, upper: int) -> float:
    """LSQ sec. 2.2: ``g = 1 / sqrt(N * Q_P)``."""
    return 1.0 / math.sqrt(n * upper)


# --- MSE range estimation --------------------------------------------------------------------


def mse_candidates(v: np.ndarray, lower: int, upper: int, n: int) -> np.ndarray:
    """Candidate scales relative to the tensor's range: ``(k / n) * m / u``, ``k = 1..n``,
    ``m`` the largest magnitude the grid must cover (``max|v|`` on a signed grid, ``max(v)``
    on an unsigned one, where negative values all map to 0)."""
    m = float(np.abs(v).max()) if lower < 0 else max(float(np.max(v)), 0.0)
    return np.arange(1, n + 1, dtype=np.float64) / n * m / upper


def quantization_errors(v: np.ndarray, candidates: np.ndarray, lower: int,
                        upper: int) -> np.ndarray:
    """``||v_hat(s) - v||^2`` for each candidate ``s``."""
    v = np.asarray(v, np.float64).reshape(-1)
    return np.array([((lsq_forward(v, s, lower, upper) - v) ** 2).sum() for s in candidates])


def mse_brute_force(v: np.ndarray, lower: int, upper: int,
                    n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``(candidates, errors)`` of one tensor (or one channel): the MSE scale is the candidate
    of least error, the smallest on ties; 1 for a tensor with nothing to quantize."""
    candidates = mse_candidates(v, lower, upper, n)
    if candidates[-1] == 0:
        return np.ones(1), np.zeros(1)
    return candidates, quantization_errors(v, candidates, lower, upper)


# --- gradient disorder and Algorithm 1 -------------------------------------------------------


def sgn(v: float) -> int:
    return (v > 0) - (v < 0)


def disorder_reference(window: list[float]) -> Fraction:
    """Definition 3.1: ``(1/K) * #{j : sgn(S1_j) != sgn(S2_j)}``, S1 = g_1..g_{K-1},
    S2 = g_2..g_K, with ``sgn(0) = 0``."""
    s1, s2 = window[:-1], window[1:]
    return Fraction(sum(sgn(a) != sgn(b) for a, b in zip(s1, s2)), len(window))


def decide(rule: str, delta: Fraction, frozen: bool, r: float) -> bool:
    """Algorithm 1 lines 13-17 and the Table 4 ablations, ``r`` taken as the decimal written
    (``0.2`` is 1/5, so a disorder of exactly 1/5 is not below it)."""
    below = delta < Fraction(repr(r))
    return {"gaqat": below, "reverse": not below, "no_unfreeze": frozen or below}[rule]


def schedule_reference(g_task: list[list[float]], g_smooth: list[list[float]], K: int,
                       r: float, rule: str) -> dict[str, list]:
    """Algorithm 1 step by step: at step ``t`` a scale gets ``0.5 * g_smooth`` if frozen, else
    ``0.5 * (g_task + g_smooth)``; then, when ``t mod K == 0`` and ``t > 0`` (at ``t = 0`` no
    ``K``-step window exists), the disorder of ``g_task`` over steps ``t-K+1..t`` decides the
    flags for the next ``K`` steps. Returns the applied gradients, flags and disorder after
    every step."""
    n = len(g_task[0])
    frozen, delta = [False] * n, [Fraction(0)] * n
    out: dict[str, list] = {"grad": [], "frozen": [], "disorder": []}
    for t in range(len(g_task)):
        out["grad"].append([0.5 * g_smooth[t][i] if frozen[i]
                            else 0.5 * (g_task[t][i] + g_smooth[t][i]) for i in range(n)])
        if t > 0 and t % K == 0:
            delta = [disorder_reference([g[i] for g in g_task[t - K + 1:t + 1]])
                     for i in range(n)]
            frozen = [decide(rule, delta[i], frozen[i], r) for i in range(n)]
        out["frozen"].append(list(frozen))
        out["disorder"].append(list(delta))
    return out


# --- model selection and tables --------------------------------------------------------------


def train_envs(record: dict) -> list[int]:
    n = sum(1 for key in record if key.startswith("env") and key.endswith("_out_acc"))
    return [e for e in range(n) if e not in record["args"]["test_envs"]]


def val_accuracy(record: dict) -> float:
    """The tables' "val": mean training-domain out-split accuracy."""
    return statistics.fmean(record[f"env{e}_out_acc"] for e in train_envs(record))


def criterion(record: dict, rule: str) -> float:
    """Test-domain validation (``test``, ``test_last``): mean test-domain out-split accuracy;
    training-domain validation (``train``): :func:`val_accuracy`."""
    if rule == "train":
        return val_accuracy(record)
    return statistics.fmean(record[f"env{e}_out_acc"] for e in record["args"]["test_envs"])


def choose_reference(runs: list[tuple[str, list[dict], int]], rule: str,
                     last: bool = False) -> tuple[str, dict] | None:
    """``(path, record)`` chosen among ``(path, records, eval_from)``: the checkpoint of best
    criterion over every run's records at or after its ``eval_from`` (``test_last`` or
    ``last``: only each run's last one); ties to the first run by path, then the earlier step."""
    pool = []
    for path, records, eval_from in runs:
        usable = sorted((r for r in records if r["step"] >= eval_from), key=lambda r: r["step"])
        if last or rule == "test_last":
            usable = usable[-1:]
        pool += [(path, r) for r in usable]
    if not pool:
        return None
    best = max(criterion(r, rule) for _, r in pool)
    return min(((p, r) for p, r in pool if criterion(r, rule) == best),
               key=lambda pr: (pr[0], pr[1]["step"]))


def row_key(hparams: dict, algorithm: str, split_by: list[str]) -> tuple:
    """A table row: algorithm, "W/A" ("Full" without quantizers) and the ``split_by`` values."""
    bits = f"{hparams['w_bits']}/{hparams['a_bits']}" if "w_bits" in hparams else "Full"
    return (algorithm, bits, *(hparams.get(k, "-") for k in split_by))


def _mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and DomainBed's standard error (population std / sqrt(n))."""
    return statistics.fmean(values), statistics.pstdev(values) / math.sqrt(len(values))


def table_reference(runs: list[tuple[str, list[dict], int]], rule: str,
                    split_by: list[str]) -> dict[tuple, tuple]:
    """``{(dataset, row, domain index or "Avg"): (val_mean, val_se, test_mean, test_se,
    n_trials)}`` in %, for finished runs whose test-env groups are disjoint (PACS's single
    domains, DomainNet's pairs). One choice per (dataset, row, test envs, trial); a domain's
    cell is read from its group; Avg: per trial the mean over every test domain of the
    dataset, over the trials that have them all."""
    cells = defaultdict(list)
    for path, records, eval_from in runs:
        first = records[0]
        args = first["args"]
        key = (args["dataset"], row_key(first["hparams"], args["algorithm"], split_by),
               tuple(sorted(args["test_envs"])), args["trial_seed"])
        cells[key].append((path, records, eval_from))
    per_trial = defaultdict(dict)  # (dataset, row, trial) -> domain -> (val, test)
    domains = defaultdict(set)
    for (dataset, row, group, trial), candidates in cells.items():
        chosen = choose_reference(candidates, rule)
        if chosen is None:
            continue
        _, record = chosen
        for env in group:
            per_trial[dataset, row, trial][env] = (100 * val_accuracy(record),
                                                   100 * record[f"env{env}_in_acc"])
            domains[dataset].add(env)
    by_cell = defaultdict(list)
    for (dataset, row, _), values in per_trial.items():
        for env, pair in values.items():
            by_cell[dataset, row, env].append(pair)
        if set(values) == domains[dataset]:
            by_cell[dataset, row, "Avg"].append(
                tuple(statistics.fmean(p[i] for p in values.values()) for i in (0, 1)))
    return {key: (*_mean_se([p[0] for p in pairs]), *_mean_se([p[1] for p in pairs]),
                  len(pairs)) for key, pairs in by_cell.items()}


def swad_rows(runs: list[tuple[str, list[dict], int]]) -> list[tuple[str, list[dict], int]]:
    """The SWAD models of runs as runs: a run whose last record (the highest step) has
    ``swad_env{i}_{in,out}_acc`` keys gives one run of one record, those accuracies as its
    ``env{i}_*_acc``, the algorithm ``<algorithm> (SWAD)``, every step counted."""
    out = []
    for path, records, _ in runs:
        last = max(records, key=lambda r: r["step"])
        swad = {k[len("swad_"):]: v for k, v in last.items() if k.startswith("swad_env")}
        if swad:
            record = {k: v for k, v in last.items() if not k.startswith(("env", "swad_"))}
            record.update(swad)
            record["args"] = dict(last["args"], algorithm=last["args"]["algorithm"] + " (SWAD)")
            out.append((path, [record], 0))
    return out


# --- SWAD's LossValley -----------------------------------------------------------------------


def loss_valley_reference(losses: list[float], n_converge: int, n_tolerance: int,
                          tolerance_ratio: float) -> dict:
    """The official ``LossValley.update_and_evaluate`` at each of ``losses`` (segment ``i``
    ends at evaluation ``i``), then ``get_final_model``, on segment indices. Returns the
    evaluation it converged at (the converging segment's index) or None, the evaluation the
    valley died at or None, and ``terms``: the segments the final average is the mean of, in
    the order ``update_parameters`` saw them (``AveragedModel(segment)`` starts at
    ``n_averaged = 0``, so its first update overwrites the copy: a final model that was never
    updated is its copy of the converging segment); without convergence the last segment."""
    converge_q, smooth_q = deque(maxlen=n_converge), deque(maxlen=n_tolerance)
    converge_step = threshold = dead = None
    copy_of, updates = None, []
    for i in range(len(losses)):
        if dead is not None:
            break  # the trainer stops training
        converge_q.append(i)
        smooth_q.append(i)
        if converge_step is None:
            if len(converge_q) < n_converge:
                continue
            q = list(converge_q)
            min_idx = min(range(len(q)), key=lambda j: (losses[q[j]], j))  # np.argmin
            if min_idx == 0:
                converge_step = q[0]
                copy_of = q[0]
                threshold = statistics.fmean(losses[j] for j in q) * (1.0 + tolerance_ratio)
                if n_tolerance < n_converge:
                    for k in range(n_converge - n_tolerance):
                        updates.append(q[1 + k])
                elif n_tolerance > n_converge:
                    window = list(smooth_q)[:n_tolerance - n_converge + 1]
                    start_idx = 0
                    for k in reversed(range(len(window))):
                        if losses[window[k]] > threshold:
                            start_idx = k + 1
                            break
                    updates += window[start_idx + 1:]
            continue
        if smooth_q[0] < converge_step:
            continue
        if min(losses[j] for j in smooth_q) > threshold:
            dead = i
            continue
        updates.append(smooth_q[0])
    if converge_step is None:
        return {"converged": None, "dead": None, "terms": [len(losses) - 1] if losses else []}
    if dead is None:
        smooth_q.popleft()
        while smooth_q:
            if min(losses[j] for j in smooth_q) > threshold:
                break
            updates.append(smooth_q.popleft())
    return {"converged": converge_step, "dead": dead, "terms": updates or [copy_of]}


# --- the shared featurizer's quantization policy, as it was hand-walked (before the generic
# transform, commit 0635e52): the reference the transform must reproduce on a ResNet


def resnet_policy_reference(resnet, policy, quant_conv: type) -> None:
    """Replace every conv of a torchvision ResNet by ``quant_conv(conv, weight config,
    activation config)``, in place: ``conv1`` (the stem) with the policy's first-conv configs,
    every other conv with its weight / activation configs (``QuantPolicy.apply`` of commit
    0635e52, written out)."""
    from torch import nn

    QuantConv2d = quant_conv  # noqa: N806 (the name of the code it transcribes)
    for parent in list(resnet.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Conv2d:
                if parent is resnet and name == "conv1":
                    conv = QuantConv2d(child, policy.first_weight, policy.first_input)
                else:
                    conv = QuantConv2d(child, policy.weight, policy.activation)
                setattr(parent, name, conv)


def assert_collect_results_row(report: str, algorithm: str, folders, n_envs: int) -> None:
    """DomainBed's ``collect_results`` row of ``algorithm`` (training-domain validation, one
    run per single test env, as ``--n_hparams 1 --n_trials 1 --single_test_envs`` sweeps):
    each test env's number is the in-split accuracy of the record whose mean out-split accuracy
    over the training envs is highest, recomputed from the runs' own records in ``folders``."""
    import json

    section = report.split("model selection method: training-domain validation set")[1]
    section = section.split("--------")[0]
    expected = {}
    for folder in folders:
        records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        if records[0]["args"]["algorithm"] == algorithm:
            [env] = records[0]["args"]["test_envs"]
            best = max(records, key=lambda r: np.mean(
                [r[f"env{i}_out_acc"] for i in range(n_envs) if i != env]))
            expected[env] = round(100 * best[f"env{env}_in_acc"], 1)
    [row] = [line.split() for line in section.splitlines() if line.startswith(algorithm)]
    assert [float(row[1 + 3 * e]) for e in range(n_envs)] == [expected[e] for e in range(n_envs)]
