"""The plugin's algorithms through DomainBed's real ``train.py`` (paper sec. 2.2 and 3.3), the
reload of ``model.pkl`` with the GAQAT freeze schedule (Algorithm 1), and CPU determinism."""

import copy
import json
import math
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from support.helpers import PYTHON, run
from support.references import decide, disorder_reference

from domainbed_gaqat.plugin.algorithms import ALGORITHMS
from domainbed_gaqat.plugin.hooks import LoopHooks
from tests.test_freezing import Recorder, batches, calibrate, make_algorithm

GAQAT_FAMILY = {name: s.cls.FREEZE_RULE for name, s in ALGORITHMS.items()
                if "gaqat" in s.families}
K = 2
# every registered algorithm DomainBed's train.py can run (those needing the loop hooks of
# `gaqat train`, SWAD's, refuse it: tests/test_swad.py): name -> (algorithm, steps,
# checkpoint_freq); GAQAT runs past two windows, "GAQAT_again" repeats it for determinism
RUNS = {name: (name, 3 if "sagm" in s.families else 2, 10) for name, s in ALGORITHMS.items()
        if not issubclass(s.cls, LoopHooks)}
RUNS["GAQAT"] = RUNS["GAQAT_again"] = ("GAQAT", 5, 4)


def overrides(algorithm: str) -> dict:
    return {"batch_size": 8, **({"gaqat_K": K} if algorithm in GAQAT_FAMILY else {})}


def checkpoint_steps(steps: int, freq: int) -> list[int]:
    """The steps at which train.py writes a results.jsonl record."""
    return [s for s in range(steps) if s % freq == 0 or s == steps - 1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every run of ``RUNS``, two at a time, one thread each (the same for both GAQAT runs)."""
    root = tmp_path_factory.mktemp("train")

    def launch(name: str) -> Path:
        algorithm, steps, freq = RUNS[name]
        out = root / name
        run([PYTHON, "-m", "domainbed.scripts.train", "--dataset", "RotatedDigits",
             "--algorithm", algorithm, "--steps", str(steps), "--checkpoint_freq", str(freq),
             "--test_envs", "0", "--seed", "0", "--hparams", json.dumps(overrides(algorithm)),
             "--output_dir", str(out)], cwd=root, timeout=600, OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1")
        return out

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(RUNS, pool.map(launch, RUNS)))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def load_model(out: Path) -> dict:
    return torch.load(out / "model.pkl", map_location="cpu", weights_only=True)


def fresh_from(ckpt: dict, name: str):
    from domainbed import algorithms

    algorithm = algorithms.get_algorithm_class(name)(
        ckpt["model_input_shape"], ckpt["model_num_classes"], ckpt["model_num_domains"],
        ckpt["model_hparams"])
    algorithm.load_state_dict(ckpt["model_dict"], strict=True)
    return algorithm


def env_out_split(env_index: int, holdout_fraction: float = 0.2, trial_seed: int = 0):
    """train.py's ``env{i}_out`` split of RotatedDigits."""
    from domainbed import datasets
    from domainbed.lib import misc

    dataset = datasets.RotatedDigits(None, [0], {})
    env = dataset[env_index]
    out, _ = misc.split_dataset(env, int(len(env) * holdout_fraction),
                                misc.seed_hash(trial_seed, env_index))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in RUNS if n != "GAQAT_again"])
def test_train_writes_results_and_model(runs: dict[str, Path], name: str) -> None:
    """results.jsonl has one record per checkpoint with plain-float diagnostics; model.pkl
    reloads (weights_only, strict) into a fresh instance that reproduces the last accuracy."""
    algorithm, steps, freq = RUNS[name]
    out = runs[name]
    assert (out / "done").exists()
    recs = records(out)
    assert [r["step"] for r in recs] == checkpoint_steps(steps, freq)
    diagnostics = {"loss"} | ({"frozen_frac", "disorder_mean"} if algorithm in GAQAT_FAMILY
                              else set())
    accs = {f"env{i}_{s}_acc" for i in range(6) for s in ("in", "out")}
    base = {"step", "epoch", "step_time", "mem_gb", "hparams", "args"}
    for rec in recs:
        assert set(rec) == base | accs | diagnostics
        assert all(type(rec[k]) is float and math.isfinite(rec[k]) for k in diagnostics)
        assert all(0.0 <= rec[k] <= 1.0 for k in accs | diagnostics - {"loss"})
        assert rec["hparams"]["batch_size"] == 8
    if algorithm in GAQAT_FAMILY:
        assert recs[0]["frozen_frac"] == 0.0 and recs[0]["disorder_mean"] == 0.0  # no t=0 window
        assert recs[0]["hparams"]["gaqat_K"] == K

    ckpt = load_model(out)
    fresh = fresh_from(ckpt, algorithm)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the run
    try:
        from domainbed.lib import misc
        from domainbed.lib.fast_data_loader import FastDataLoader

        loader = FastDataLoader(dataset=env_out_split(0), batch_size=64, num_workers=0)
        assert misc.accuracy(fresh, loader, None, "cpu") == recs[-1]["env0_out_acc"]
    finally:
        torch.set_num_threads(threads)

    if algorithm in GAQAT_FAMILY:
        state = ckpt["model_dict"]
        frozen, disorder = state["freezer.frozen"], state["freezer.tracker.disorder"]
        assert int(state["freezer.tracker.step"]) == steps
        assert torch.equal(fresh.freezer.frozen, frozen)
        assert torch.equal(fresh.freezer.tracker.disorder, disorder)
        r = ckpt["model_hparams"]["gaqat_r"]
        rule = GAQAT_FAMILY[algorithm]
        # GAQAT's flags are its last window's decision alone; the ablations' runs end after
        # their first decision, made from all-unfrozen flags (several decisions of each rule
        # against the brute-force schedule: test_freezing.py)
        assert rule == "gaqat" or steps - 1 < 2 * K
        assert frozen.tolist() == [decide(rule, Fraction(d).limit_denominator(K), False, r)
                                   for d in disorder.tolist()]


@pytest.mark.slow
def test_same_seed_same_results(runs: dict[str, Path]) -> None:
    """Two identical GAQAT commands: equal results.jsonl (all keys but step_time and the output
    folder) and bit-identical model.pkl."""
    first, second = records(runs["GAQAT"]), records(runs["GAQAT_again"])
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        for rec in (a, b):
            rec.pop("step_time")
            rec["args"].pop("output_dir")
        assert a == b
    state_a, state_b = load_model(runs["GAQAT"]), load_model(runs["GAQAT_again"])
    assert state_a["model_dict"].keys() == state_b["model_dict"].keys()
    for key, value in state_a["model_dict"].items():
        assert torch.equal(value, state_b["model_dict"][key]), key


@pytest.mark.slow
def test_reloaded_gaqat_continues_the_schedule(runs: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """model.pkl of a 5-step run with K = 2 holds step 5: a reloaded GAQAT keeps its flags and
    disorder for step 5 and re-decides at step 6 from the disorder of steps 5..6."""
    ckpt = load_model(runs["GAQAT"])
    algorithm = fresh_from(ckpt, "GAQAT")
    r = ckpt["model_hparams"]["gaqat_r"]
    frozen, disorder = algorithm.freezer.frozen.clone(), algorithm.freezer.tracker.disorder.clone()
    recorder = Recorder(algorithm)
    data = batches(2, seed=5)
    algorithm.update(data[0])  # t = 5: not a multiple of K
    assert torch.equal(algorithm.freezer.frozen, frozen)
    assert torch.equal(algorithm.freezer.tracker.disorder, disorder)
    algorithm.update(data[1])  # t = 6: decision
    window = [g.tolist() for g in recorder.g_task]
    delta = [disorder_reference([g[i] for g in window]) for i in range(len(frozen))]
    assert algorithm.freezer.tracker.disorder.tolist() == pytest.approx([float(d) for d in delta])
    assert algorithm.freezer.frozen.tolist() == [decide("gaqat", d, False, r) for d in delta]
    assert int(algorithm.freezer.tracker.step) == 7


def test_reload_mid_window_continues_like_the_original(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A GAQAT saved mid-window (after steps 0..3, K = 2: step 3 opens the window 3..4) the way
    train.py saves it, reloaded with ``weights_only=True`` and ``strict=True`` into a fresh
    instance (Adam state copied: train.py does not save it), continues exactly like the
    original: same flags at every step, flags re-decided at step 4 from a window that
    straddles the save, and the same final state, bit for bit."""
    k, r = 2, 0.3
    data = batches(6, seed=7)
    original = make_algorithm("GAQAT", gaqat_K=k, gaqat_r=r, batch_size=4)
    calibrate(original, data)
    before = Recorder(original)
    for t in range(4):
        original.update(data[t])
    # a state whose next decision surely changes some flags: all frozen
    original.freezer.frozen.fill_(True)
    torch.save({"model_dict": original.state_dict(),
                "model_hparams": original.hparams}, tmp_path / "model.pkl")
    saved = torch.load(tmp_path / "model.pkl", weights_only=True)
    reloaded = make_algorithm("GAQAT", seed=1, gaqat_K=k, gaqat_r=r, batch_size=4)
    reloaded.load_state_dict(saved["model_dict"], strict=True)
    reloaded.optimizer.load_state_dict(copy.deepcopy(original.optimizer.state_dict()))

    flags, g_task = {}, {}
    for name, algorithm in (("original", original), ("reloaded", reloaded)):
        recorder = Recorder(algorithm)
        torch.manual_seed(0)
        flags[name] = []
        for t in (4, 5):
            algorithm.update(data[t])
            flags[name].append(algorithm.freezer.frozen.tolist())
        g_task[name] = recorder.g_task
    assert flags["original"] == flags["reloaded"]
    window = [before.g_task[3].tolist(), g_task["reloaded"][0].tolist()]
    delta = [disorder_reference([g[i] for g in window]) for i in range(len(window[0]))]
    expected = [decide("gaqat", d, True, r) for d in delta]
    assert flags["reloaded"][0] == expected != [True] * len(expected)  # t = 4: decision
    assert flags["reloaded"][1] == expected  # t = 5
    for (key, a), b in zip(original.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), key
