"""``gaqat train`` / ``python -m domainbed_gaqat.train``: DomainBed's ``domainbed.scripts.train``
for runs you can leave alone.

The same arguments and outputs (``results.jsonl`` records with the same keys, ``out.txt``,
``err.txt``, ``model.pkl``, ``done``), DomainBed's datasets, splits and evaluation order. In
addition:

- **One owner**: the run folder is locked for the process's lifetime; a second process on it
  refuses at once (exit 2), naming the owner.
- **Checked before any work** (exit 2, one line naming the value and what was expected): steps,
  frequencies, seeds, fractions, test envs (in range, distinct, a training env left), every
  hparam (finite; the plugin's within documented bounds), the batch size against the smallest
  training split, and the folder: one holding another run (finished or not) is refused with the
  fields that differ; one holding this finished run has nothing to do.
- **Stops are exact**: SIGINT, SIGTERM and SIGUSR2 (Ctrl-C, ``timeout``, Slurm's time limit and
  preemption, sent to the whole process group) save the state after the current step, or at
  once while waiting for data or evaluating, and exit with 128 + signal; ``--save_every`` steps
  save it too. The same command continues; records written after the saved state (and a torn
  line) are moved to ``results.rolled_back.jsonl`` first, so whatever stopped the run (a kill
  at any instant included) the records end as an uninterrupted run's. The resume state is
  untrusted: read weights-only. Its identity is the run's meaning (:class:`~.runs.RunSpec`),
  so a moved folder resumes.
- **Divergence stops the run**: a non-finite loss (or other step statistic) ends the run at the
  next checkpoint with the step it first appeared (exit 1, no ``done``, the last saved state
  kept); ``--allow_nonfinite`` tolerates it.
- **Data**: DomainBed's sampling from per-environment generators, augmentations seeded per batch
  (:mod:`~domainbed_gaqat.plugin.loaders`): records do not depend on the number of loader
  workers (``--workers``; default within the CPUs given) or on resumes, and a resume skips to its
  batch without loading an image. DomainBed's own loaders draw from the global random state,
  so the records are statistically, not bitwise, those of DomainBed's train.py.
- **GPU**: ``--precision bf16`` (autocast, weight-cast cache off so SAGM's second pass sees the
  perturbed weights; quantizer scales and state stay float32); the step statistics of the
  plugin's algorithms stay on the device until a checkpoint (no host sync per step); pinned
  memory and non-blocking copies; ``--deterministic`` for bit-exact GPU reruns.
- ``--eval_from N`` skips the evaluations of checkpoints before step N (the last step is always
  evaluated); ``--member M`` marks an ensemble member. Algorithms that need more of the loop
  (SWAD) get it through :mod:`~domainbed_gaqat.plugin.hooks`.
"""

import collections
import json
import math
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from domainbed_gaqat import options
from domainbed_gaqat.experiments.runfiles import MODEL, RunFiles
from domainbed_gaqat.experiments.runs import OWN_DEFAULTS, PRECISIONS, RunSpec
from domainbed_gaqat.plugin import hooks, loaders
from domainbed_gaqat.plugin.data import build_dataset, split_envs
from domainbed_gaqat.plugin.hparams import train_hparams
from domainbed_gaqat.plugin.model_files import checkpoint_dict
from domainbed_gaqat.plugin.registry import algorithm_class

STOP_SIGNALS = loaders.STOP_SIGNALS
SEED_LIMIT = 2**32  # NumPy's seeds
# this entry's own arguments: not recorded (those that change the run are RunSpec fields)
LOOP_ARGS = ("save_every", "workers", "deterministic", "allow_nonfinite")


def add_arguments(parser) -> None:
    """DomainBed train.py's arguments (names, defaults), then this entry's own."""
    options.run_identity(parser)
    group = parser.add_argument_group("training (as domainbed.scripts.train)")
    group.add_argument("--task", default="domain_generalization",
                       choices=["domain_generalization", "domain_adaptation"])
    group.add_argument("--steps", type=int, default=None,
                       help="number of steps (default: the dataset's)")
    group.add_argument("--checkpoint_freq", type=int, default=None,
                       help="checkpoint every N steps (default: the dataset's)")
    group.add_argument("--output_dir", default="train_output")
    group.add_argument("--uda_holdout_fraction", type=float, default=0,
                       help="for domain adaptation, %% of test to use unlabeled for training")
    group.add_argument("--skip_model_save", action="store_true")
    group.add_argument("--save_model_every_checkpoint", action="store_true")
    own = parser.add_argument_group("this entry's own")
    own.add_argument("--save_every", type=int, default=500,
                     help="write the resume state every N steps (0: only when stopped)")
    own.add_argument("--eval_from", type=int, default=0,
                     help="skip the evaluations of checkpoints before this step")
    own.add_argument("--member", type=int, default=0,
                     help="ensemble member index (a sweep stage's `members`; its seed differs): "
                          "recorded, so that tables and EoQ tell members apart")
    own.add_argument("--precision", default="fp32",
                     help=f"training arithmetic, one of {PRECISIONS} (bf16: autocast)")
    own.add_argument("--workers", type=int, default=None,
                     help="data loader worker processes in total (default: the CPUs given but "
                          "one, none for in-memory datasets); records do not depend on it")
    own.add_argument("--deterministic", action="store_true",
                     help="torch.use_deterministic_algorithms: bit-exact GPU reruns, slower")
    own.add_argument("--allow_nonfinite", action="store_true",
                     help="keep training when the loss is not finite (default: stop)")


def recorded_args(args) -> dict:
    """``vars(args)`` as records hold them: DomainBed's arguments, and this entry's own only
    where they change the run (away from their defaults)."""
    return {k: v for k, v in vars(args).items()
            if k not in LOOP_ARGS and (k not in OWN_DEFAULTS or v != OWN_DEFAULTS[k])}


# --- checks before any work -----------------------------------------------------------------


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_arguments(args) -> None:
    """Every argument that can be checked without data (``ValueError`` naming the value)."""
    from domainbed import datasets

    for name in ("steps", "checkpoint_freq"):
        value = getattr(args, name)
        _expect(value is None or value >= 1, f"--{name} {value}: expected an integer >= 1")
    for name in ("save_every", "eval_from", "member", "hparams_seed", "trial_seed"):
        value = getattr(args, name)
        _expect(value >= 0, f"--{name} {value}: expected an integer >= 0")
    _expect(0 <= args.seed < SEED_LIMIT, f"--seed {args.seed}: expected 0..{SEED_LIMIT - 1}")
    _expect(args.workers is None or args.workers >= 0,
            f"--workers {args.workers}: expected an integer >= 0")
    _expect(0 < args.holdout_fraction < 1,
            f"--holdout_fraction {args.holdout_fraction}: expected a number in (0, 1)")
    _expect(0 <= args.uda_holdout_fraction < 1,
            f"--uda_holdout_fraction {args.uda_holdout_fraction}: expected a number in [0, 1)")
    _expect(args.precision != "fp16",
            "--precision fp16: not supported: fp16 needs a gradient scaler between backward and "
            "the optimizer step, which the algorithms' update() runs itself; use bf16")
    _expect(args.precision in PRECISIONS,
            f"--precision {args.precision!r}: expected one of {PRECISIONS}")
    _expect(args.dataset in datasets.DATASETS,
            f"--dataset {args.dataset!r}: expected one of {datasets.DATASETS}")
    n_envs = datasets.num_environments(args.dataset)
    envs = args.test_envs
    _expect(all(0 <= e < n_envs for e in envs) and len(set(envs)) == len(envs) and envs,
            f"--test_envs {' '.join(map(str, envs))}: expected distinct environments of "
            f"{args.dataset} in 0..{n_envs - 1}")
    _expect(len(envs) < n_envs, f"--test_envs {' '.join(map(str, envs))}: every environment of "
            f"{args.dataset} is a test env: expected at least one to train on")
    algorithm_class(args.algorithm)


def _finite(value: object, where: str) -> None:
    """Every number inside ``value`` is finite (JSON allows NaN and Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"hparams {where}={value!r}: expected a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _finite(item, f"{where}[{i}]")


def resolve_hparams(args) -> dict:
    """train.py's hparams (the registry's draw, then ``--hparams``), checked: finite, and the
    plugin's algorithms' keys and bounds."""
    hparams = train_hparams(args.algorithm, args.dataset, args.hparams_seed, args.trial_seed,
                            args.hparams)
    _finite(dict(hparams), "")
    spec = getattr(algorithm_class(args.algorithm), "SPEC", None)
    if spec is not None:
        from domainbed_gaqat.plugin.hparams import validate

        validate(spec, hparams)
    return hparams


# --- signals ---------------------------------------------------------------------------------


class Interrupted(Exception):
    """A stop signal arrived while the loop waited for data or evaluated."""


class Stop:
    """Remembers SIGINT / SIGTERM / SIGUSR2 until the current step is done; inside
    :meth:`interruptible` (waiting for data, evaluating) the signal interrupts at once. The
    previous handlers come back on exit."""

    def __enter__(self) -> "Stop":
        self.signum, self._now = 0, False
        self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum
        if self._now:
            self._now = False
            raise Interrupted(signum)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        if self.signum:
            raise Interrupted(self.signum)
        self._now = True
        try:
            yield
        finally:
            self._now = False


# --- logs ---------------------------------------------------------------------------------


class _Tee:
    """A stream written to the terminal and appended to a file; a failing file (a full disk)
    is dropped with one warning instead of breaking the run."""

    def __init__(self, stream, path: str) -> None:
        self.stream, self.path = stream, path
        self.file = open(path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        self.stream.write(text)
        if self.file is not None:
            try:
                self.file.write(text)
                self.file.flush()
            except OSError as err:
                self.file = None
                self.stream.write(f"warning: stopped writing {self.path}: {err}\n")

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Logged:
    """train.py's ``out.txt`` / ``err.txt``; an error that ends the run is written into
    ``err.txt`` too (the terminal gets it from ``gaqat``)."""

    def __init__(self, folder: RunFiles) -> None:
        self.folder = folder

    def __enter__(self) -> None:
        self.saved = sys.stdout, sys.stderr
        sys.stdout = _Tee(sys.stdout, self.folder.file("out.txt"))
        sys.stderr = _Tee(sys.stderr, self.folder.file("err.txt"))

    def __exit__(self, kind, error, tb) -> None:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.saved
        if error is not None and err.file is not None:
            if isinstance(error, (options.CommandFailed, ValueError, FileNotFoundError)):
                err.file.write(f"gaqat train: {error}\n")
            else:
                err.file.write("".join(traceback.format_exception(kind, error, tb)))
        out.close()
        err.close()


def _print_environment(args, hparams: dict) -> None:
    import PIL
    import torchvision

    print("Environment:")
    print(f"\tPython: {sys.version.split(' ')[0]}")
    print(f"\tPyTorch: {torch.__version__}")
    print(f"\tTorchvision: {torchvision.__version__}")
    print(f"\tCUDA: {torch.version.cuda}")
    print(f"\tCUDNN: {torch.backends.cudnn.version()}")
    print(f"\tNumPy: {np.__version__}")
    print(f"\tPIL: {PIL.__version__}")
    print("Args:")
    for k, v in sorted(vars(args).items()):
        print(f"\t{k}: {v}")
    print("HParams:")
    for k, v in sorted(hparams.items()):
        print(f"\t{k}: {v}")


# --- random states as tensors and plain lists (weights-only loadable) ---------------------


def rng_state() -> dict:
    """Python's, NumPy's, torch's CPU and the current CUDA device's random states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(gauss)],
            "python": [version, list(internal), python_gauss]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            print("note: the state was saved on a GPU, this run continues on the CPU: its "
                  "random draws differ from an uninterrupted run's")
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = state["python"]
    random.setstate((version, tuple(internal), python_gauss))


def optimizers(algorithm) -> dict:
    """The algorithm's optimizers, by attribute name (DomainBed's keep them as attributes)."""
    return {name: value for name, value in vars(algorithm).items()
            if isinstance(value, torch.optim.Optimizer)}


# --- the run ------------------------------------------------------------------------------


class RunData:
    """The dataset, train.py's splits and names, and the loaders of one run."""

    def __init__(self, args, hparams: dict) -> None:
        self.args, self.hparams = args, hparams
        self.dataset = build_dataset(args.dataset, args.data_dir, args.test_envs, hparams)
        self.in_splits, self.out_splits, self.uda_splits = split_envs(
            self.dataset, args.test_envs, hparams, args.holdout_fraction, args.trial_seed,
            args.uda_holdout_fraction)
        if args.task == "domain_adaptation" and not self.uda_splits:
            raise ValueError("--task domain_adaptation: not enough unlabeled samples (raise "
                             "--uda_holdout_fraction)")
        self.train = [(i, split) for i, split in enumerate(self.in_splits)
                      if i not in args.test_envs]
        self.uda = list(enumerate(self.uda_splits)) if args.task == "domain_adaptation" else []
        batch = hparams["batch_size"]
        for kind, splits in (("training", self.train), ("unlabeled", self.uda)):
            for i, (split, _) in splits:
                _expect(batch <= len(split),
                        f"batch_size {batch}: expected at most {len(split)}, the size of the "
                        f"smallest {kind} split (env {i}); a larger batch is never drawn")
        self.eval_splits = [split for split, _ in self.in_splits + self.out_splits
                            + self.uda_splits]
        self.eval_names = ([f"env{i}_in" for i in range(len(self.in_splits))]
                           + [f"env{i}_out" for i in range(len(self.out_splits))]
                           + [f"env{i}_uda" for i in range(len(self.uda_splits))])
        self.steps_per_epoch = min(len(env) / batch for env, _ in self.in_splits)
        self.n_steps = args.steps or self.dataset.N_STEPS
        self.checkpoint_freq = args.checkpoint_freq or self.dataset.CHECKPOINT_FREQ
        self.workers = loaders.worker_budget(args.workers, self.dataset.N_WORKERS,
                                             len(self.train) + len(self.uda))
        self.pin = torch.cuda.is_available()

    def streams(self, start: int) -> tuple[Iterator, Iterator | None]:
        """Training (and unlabeled) batches from step ``start`` on, ``zip``-ped as train.py."""
        shares = loaders.share(self.workers, len(self.train) + len(self.uda))

        def loader(kind: str, i: int, split, weights, workers: int) -> Iterator:
            seed = loaders.seed_of(self.args.seed, kind, i)
            return loaders.train_loader(split, weights, self.hparams["batch_size"], seed, start,
                                        workers, self.pin)

        train = [loader("train", i, *s, w) for (i, s), w in zip(self.train, shares)]
        uda = [loader("uda", i, *s, w) for (i, s), w in zip(self.uda, shares[len(self.train):])]
        return zip(*train), (zip(*uda) if uda else None)

    def evaluation(self, name: str, split) -> Iterator:
        return loaders.eval_batches(split, loaders.seed_of(self.args.seed, "eval", name),
                                    self.workers, self.pin)


class Training:
    """train.py's loop over one run (see the module docstring), from a saved state or step 0."""

    def __init__(self, args, spec: RunSpec, hparams: dict, data: RunData, folder: RunFiles,
                 saved: dict | None, stop: Stop) -> None:
        self.args, self.spec, self.hparams, self.data = args, spec, hparams, data
        self.folder, self.saved, self.stop = folder, saved, stop
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.autocast = (torch.autocast(self.device, dtype=torch.bfloat16, cache_enabled=False)
                         if args.precision == "bf16" else nullcontext())
        with hooks.hosted():
            self.algorithm = algorithm_class(args.algorithm)(
                data.dataset.input_shape, data.dataset.num_classes,
                len(data.dataset) - len(args.test_envs), hparams)
        self.step_vals: dict[str, list] = collections.defaultdict(list)
        self.last_keys: list[str] | None = None
        self.nonfinite: torch.Tensor | int | None = None  # first step with a bad statistic

    # --- state ---------------------------------------------------------------------------

    def restore(self) -> tuple[int, bool]:
        """Load the saved state; returns ``(next step, whether its record is pending)``."""
        saved = self.saved
        self.algorithm.load_state_dict(saved["algorithm"])
        self.algorithm.to(self.device)
        for name, optimizer in optimizers(self.algorithm).items():
            optimizer.load_state_dict(saved["optimizers"][name])
        set_rng_state(saved["rng"])
        self.step_vals.update({k: list(v) for k, v in saved["step_vals"].items()})
        self.last_keys = saved["last_keys"]
        return saved["step"], saved["pending_record"]

    def save_state(self, next_step: int, pending_record: bool = False) -> None:
        """The complete state after ``next_step`` steps (the pending record's step is
        ``next_step - 1``)."""
        self.check_finite()
        self.folder.save_state({
            "spec": self.spec.to_dict(), "step": next_step, "pending_record": pending_record,
            "records": self.folder.records_written(),
            "algorithm": self.algorithm.state_dict(),
            "optimizers": {n: o.state_dict() for n, o in optimizers(self.algorithm).items()},
            "rng": rng_state(), "step_vals": self._host_vals(), "last_keys": self.last_keys})

    def _host_vals(self) -> dict[str, list[float]]:
        """The step statistics so far as floats (one host sync for all of them)."""
        tensors = [v for values in self.step_vals.values() for v in values
                   if isinstance(v, torch.Tensor)]
        read = iter(torch.stack([t.double() for t in tensors]).tolist() if tensors else ())
        out = {key: [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]
               for key, values in self.step_vals.items()}
        self.step_vals = collections.defaultdict(list, out)
        return out

    # --- steps ---------------------------------------------------------------------------

    def update(self, step: int, batches: list, uda: list | None) -> None:
        """One ``update``; the plugin's algorithms keep their statistics on the device."""
        to = self.device
        minibatches = [(x.to(to, non_blocking=True), y.to(to, non_blocking=True))
                       for x, y in batches]
        unlabeled = None if uda is None else [x.to(to, non_blocking=True) for x, _ in uda]
        update = getattr(self.algorithm, "update_tensors", None) or self.algorithm.update
        with self.autocast:
            stats = update(minibatches, unlabeled)
        for key, value in stats.items():
            self.step_vals[key].append(value)
        if not self.args.allow_nonfinite:
            self._watch(step, stats)

    def _watch(self, step: int, stats: dict) -> None:
        """Remember the first step with a non-finite statistic (on the device: no sync)."""
        floats = [v for v in stats.values() if not isinstance(v, torch.Tensor)]
        tensors = [v.detach().float().reshape(()) for v in stats.values()
                   if isinstance(v, torch.Tensor)]
        if self.nonfinite is None and not all(math.isfinite(v) for v in floats):
            self.nonfinite = step
        if tensors and not isinstance(self.nonfinite, int):
            bad = ~torch.isfinite(torch.stack(tensors)).all()
            if self.nonfinite is None:
                self.nonfinite = torch.full((), -1, dtype=torch.long, device=tensors[0].device)
            self.nonfinite = torch.where(bad & (self.nonfinite < 0), step, self.nonfinite)

    def check_finite(self) -> None:
        if isinstance(self.nonfinite, torch.Tensor):
            found = int(self.nonfinite)
            self.nonfinite = None if found < 0 else found
        if self.nonfinite is not None:
            saved = self.folder.file("resume.pt")
            raise options.CommandFailed(
                f"the run diverged: a non-finite loss or step statistic at step "
                f"{self.nonfinite} ({self.args.algorithm}, lr {self.hparams.get('lr')}); the "
                f"records before it and the last saved state ({saved}) are kept for "
                "inspection; --allow_nonfinite continues such runs")

    # --- checkpoints -----------------------------------------------------------------------

    @torch.no_grad()
    def accuracy(self, model, name: str, split, with_loss: bool) -> tuple[float, float | None]:
        """``misc.accuracy`` (unweighted), the sums kept on the device; the mean
        cross-entropy too when asked."""
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        model.eval()
        try:
            for x, y in self.data.evaluation(name, split):
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                with self.autocast:
                    p = model.predict(x)
                if p.size(1) == 1:
                    correct += p.gt(0).eq(y.view(-1, 1)).sum()
                    if with_loss:
                        loss += F.binary_cross_entropy_with_logits(
                            p.float().view(-1), y.float(), reduction="sum")
                else:
                    correct += p.argmax(1).eq(y).sum()
                    if with_loss:
                        loss += F.cross_entropy(p.float(), y, reduction="sum")
        finally:
            model.train()
        n = len(split)
        return correct.item() / n, (loss.item() / n if with_loss else None)

    def measure(self, step: int) -> tuple[dict, list[float]]:
        """The checkpoint record of ``step`` (before ``hparams`` and ``args``), and the
        training-domain validation losses when the algorithm asks for them."""
        self.check_finite()
        results = {"step": step, "epoch": step / self.data.steps_per_epoch}
        for key, values in self._host_vals().items():
            results[key] = np.mean(values)
        wants_loss = hasattr(self.algorithm, "on_checkpoint")
        losses = []
        for name, split in zip(self.data.eval_names, self.data.eval_splits):
            env = int(name[3:].split("_")[0])
            with_loss = wants_loss and name.endswith("_out") and env not in self.args.test_envs
            results[name + "_acc"], loss = self.accuracy(self.algorithm, name, split, with_loss)
            if loss is not None:
                losses.append(loss)
        results["mem_gb"] = torch.cuda.max_memory_allocated() / (1024.0 * 1024.0 * 1024.0)
        return results, losses

    def loop_hooks(self, step: int, last: bool, results: dict, losses: list[float]) -> bool:
        """The algorithm's loop hooks (:mod:`~domainbed_gaqat.plugin.hooks`): the validation
        loss at every checkpoint (``on_checkpoint`` may end the run: SWAD's dead valley); at
        the end, ``on_train_end`` and the extra models' accuracies in the last record.
        Returns whether the run ends here."""
        on_checkpoint = getattr(self.algorithm, "on_checkpoint", None)
        if on_checkpoint is not None and on_checkpoint(step, float(np.mean(losses))) and not last:
            print(f"{self.args.algorithm} ends the run at step {step} (before step "
                  f"{self.data.n_steps - 1})")
            last = True
        if not last:
            return False
        on_train_end = getattr(self.algorithm, "on_train_end", None)
        if on_train_end is not None:
            batches, _ = self.data.streams(self.data.n_steps)
            on_train_end([(x.to(self.device), y.to(self.device)) for x, y in b]
                         for b in batches)
            del batches
        extra = getattr(self.algorithm, "extra_models", None)
        for prefix, model in (extra() if extra is not None else {}).items():
            for name, split in zip(self.data.eval_names, self.data.eval_splits):
                results[f"{prefix}_{name}_acc"], _ = self.accuracy(model, name, split, False)
        return True

    def record(self, results: dict) -> None:
        from domainbed.lib import misc

        keys = sorted(results)
        if keys != self.last_keys:
            misc.print_row(keys, colwidth=12)
            self.last_keys = keys
        misc.print_row([results[k] for k in keys], colwidth=12)
        results.update({"hparams": self.hparams, "args": recorded_args(self.args)})
        self.folder.append_record(json.dumps(results, sort_keys=True))
        self.step_vals = collections.defaultdict(list)

    def save_model(self, name: str) -> None:
        if not self.args.skip_model_save:
            self.folder.save_model(name, checkpoint_dict(
                recorded_args(self.args), self.data.dataset, self.args.test_envs, self.hparams,
                self.algorithm))

    def checkpoint(self, step: int, last: bool) -> None:
        """Evaluate and record ``step`` (``self.ended`` when the run ends there). A stop signal
        interrupts the evaluation (the state is saved with the record pending), not the hooks,
        which change the algorithm."""
        try:
            with self.stop.interruptible():
                results, losses = self.measure(step)
        except Interrupted:
            self.save_state(step + 1, pending_record=True)
            raise
        self.ended = self.loop_hooks(step, last, results, losses)
        self.record(results)
        if self.args.save_model_every_checkpoint:
            self.save_model(f"model_step{step}.pkl")

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        step, pending, self.ended = 0, False, False
        if self.saved is not None:
            step, pending = self.restore()
            print(f"Resuming from step {step} ({self.folder.file('resume.pt')})")
        self.algorithm.to(self.device)
        try:
            if pending:
                self.checkpoint(step - 1, step == self.data.n_steps)
            while step < self.data.n_steps and not self.ended:
                step = self.train_until_checkpoint(step)
        except Interrupted:
            step = -1  # the loaders go with the traceback, at the end of this block
        if step < 0:
            return self.stopped()
        self.save_model(MODEL)
        self.folder.finish()
        return 0

    def train_until_checkpoint(self, step: int) -> int:
        """Steps from ``step`` through the next evaluated checkpoint, whose evaluation runs
        with the training loaders' workers stopped; returns the next step."""
        n_steps, freq = self.data.n_steps, self.data.checkpoint_freq
        batches, uda = self.data.streams(step)
        while step < n_steps:
            start = time.time()
            try:
                with self.stop.interruptible():
                    minibatches = next(batches)
                    unlabeled = next(uda) if uda is not None else None
            except Interrupted:
                self.save_state(step)
                raise
            self.update(step, minibatches, unlabeled)
            self.step_vals["step_time"].append(time.time() - start)
            last = step == n_steps - 1
            evaluated = (step % freq == 0 or last) and (step >= self.args.eval_from or last)
            if evaluated:
                del batches, uda  # their workers stop: the evaluation has the CPUs
                self.checkpoint(step, last)
            elif step % freq == 0:  # a checkpoint before --eval_from: statistics dropped
                self.check_finite()
                self.step_vals = collections.defaultdict(list)
            step += 1
            if self.ended:
                break
            if self.stop.signum and step < n_steps:
                self.save_state(step)
                raise Interrupted(self.stop.signum)
            if self.args.save_every and step % self.args.save_every == 0 and step < n_steps:
                self.save_state(step)
            if evaluated:
                break
        return step

    def stopped(self) -> int:
        """The state is saved and the loaders are shut down: end the workers still alive (one
        blocked in a read would outlive the stop: they ignore stop signals); exit status
        128 + signal."""
        import multiprocessing

        for child in multiprocessing.active_children():
            child.kill()
        print(f"Stopped by signal {self.stop.signum}; state saved to "
              f"{self.folder.file('resume.pt')}: run the same command to continue")
        return 128 + self.stop.signum


def run(args) -> int:
    """``gaqat train``: check, own the folder, then train (or resume, or do nothing)."""
    check_arguments(args)
    hparams = resolve_hparams(args)
    spec = RunSpec.from_args(vars(args), hparams)
    folder = RunFiles(args.output_dir)
    with Stop() as stop, ExitStack() as ownership:

        def own() -> dict | None:
            """Own the folder; its saved state, after refusing a folder of another run."""
            ownership.enter_context(folder.owned())
            saved = folder.load_state()
            folder.check_holds(spec, saved)
            return saved

        # an existing folder is owned before the data is read: refused at once when busy
        saved = own() if os.path.isdir(args.output_dir) else None
        if folder.done:
            folder.finish()  # a stop between its two writes can leave the resume state
            print(f"{args.output_dir} holds this run, finished: nothing to do")
            return 0
        if args.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        try:
            with stop.interruptible():
                data = RunData(args, hparams)
        except Interrupted:
            return 128 + stop.signum  # nothing was written yet
        if not folder.lock.held:
            saved = own()
        moved = folder.roll_back(saved["records"] if saved else 0)
        with Logged(folder):
            _print_environment(args, hparams)
            if moved:
                print(f"Moved {moved} records written after the saved state to "
                      f"{folder.file('results.rolled_back.jsonl')}")
            return Training(args, spec, hparams, data, folder, saved, stop).run()


if __name__ == "__main__":
    from domainbed_gaqat.cli import run_as_module

    run_as_module("train")
