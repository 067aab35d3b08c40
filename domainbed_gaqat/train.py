"""``gaqat train`` / ``python -m domainbed_gaqat.train``: DomainBed's ``domainbed.scripts.train``,
resumable.

The same arguments and outputs (``results.jsonl``, ``out.txt``, ``err.txt``, ``model.pkl``,
``done``), with DomainBed's datasets, splits, loaders and evaluation in train.py's order, so
that for the same arguments the records are train.py's (timing aside). In addition:

- ``--save_every N`` (default 500; 0: only on a signal) writes the complete state to
  ``resume.pt`` atomically: the algorithm (model, buffers such as GAQAT's freeze state) and
  its optimizers, the Python / NumPy / torch / CUDA random states, the step, the pending
  checkpoint values, the number of records written, and the moments the training loaders drew
  from torch's global random state. SIGTERM or SIGUSR2 (Slurm's time limit or preemption) saves
  it after the current step and exits with status 128 + signal.
- The same command in the same ``--output_dir`` continues from ``resume.pt``: records written
  after the save are dropped (so each record is written once), DomainBed's loaders are rebuilt
  and replayed to the saved position without training (the data they load is discarded; the
  draws are restored, so the stream equals the uninterrupted one's), and the random states are
  restored. A finished run (``done``) is not rerun. The resume state is an untrusted file:
  read with ``weights_only=True``.
- ``--eval_from N`` skips the evaluations (and records) of checkpoints before step N; the last
  step is always evaluated (the paper evaluates DomainNet's QAT only from step 45,000 on).
- ``--member M`` marks an ensemble member (a sweep stage's ``members``: the same job with
  another seed); recorded, it tells members apart from a grid point a random search drew twice.

The replay reads each batch once more: resuming at step s costs the data loading of s steps.
"""

import collections
import json
import os
import random
import signal
import sys
import time

import numpy as np
import torch

from domainbed_gaqat import options
from domainbed_gaqat.experiments import outputs
from domainbed_gaqat.plugin.data import split_envs
from domainbed_gaqat.plugin.hparams import train_hparams
from domainbed_gaqat.plugin.model_files import read_weights
from domainbed_gaqat.plugin.registry import algorithm_class

RESUME_FILE = "resume.pt"
STATE_VERSION = 1
SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
# not DomainBed's arguments: recorded only when they change the results
OWN_ARGS = {"save_every": None, "eval_from": 0, "member": 0}


def add_arguments(parser) -> None:
    """DomainBed train.py's arguments (names, defaults), then this entry's own."""
    options.run(parser)
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
                     help="write the resume state every N steps (0: only on SIGTERM/SIGUSR2)")
    own.add_argument("--eval_from", type=int, default=0,
                     help="skip the evaluations of checkpoints before this step")
    own.add_argument("--member", type=int, default=0,
                     help="ensemble member index (a sweep stage's `members`; its seed differs): "
                          "recorded, so that tables and EoQ tell members apart")


def recorded_args(args) -> dict:
    """``vars(args)`` as records hold them: DomainBed's arguments, and this entry's own only
    where they change the run (``--eval_from`` or ``--member`` > 0)."""
    return {k: v for k, v in vars(args).items()
            if k not in OWN_ARGS or (OWN_ARGS[k] is not None and v != OWN_ARGS[k])}


# --- random states as tensors and plain lists (weights-only loadable) ---------------------


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(gauss)],
            "python": [version, list(internal), python_gauss]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = state["python"]
    random.setstate((version, tuple(internal), python_gauss))


def optimizers(algorithm) -> dict:
    """The algorithm's optimizers, by attribute name (DomainBed's keep them as attributes)."""
    return {name: value for name, value in vars(algorithm).items()
            if isinstance(value, torch.optim.Optimizer)}


# --- resume state ---------------------------------------------------------------------------


class ResumeState:
    """The resume file of one output folder (see the module docstring)."""

    def __init__(self, output_dir: str, args) -> None:
        self.path = os.path.join(output_dir, RESUME_FILE)
        self.results = os.path.join(output_dir, "results.jsonl")
        self.args = recorded_args(args)

    def load(self) -> dict | None:
        """The saved state, checked against this command; None where there is none."""
        if not os.path.exists(self.path):
            return None
        state = read_weights(self.path, "resume state of domainbed_gaqat.train")
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.path} is not a version-{STATE_VERSION} resume state: "
                             "delete it to start the run again")
        differ = sorted(k for k in set(state["args"]) | set(self.args)
                        if state["args"].get(k) != self.args.get(k))
        if differ:
            detail = ", ".join(f"--{k} {state['args'].get(k)!r} (now {self.args.get(k)!r})"
                               for k in differ)
            raise ValueError(f"{self.path} was written by another command: it differs in "
                             f"{detail}; run the same command, or use another --output_dir")
        return state

    def records_written(self) -> int:
        if not os.path.exists(self.results):
            return 0
        with open(self.results, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.endswith("\n"))

    def keep_records(self, n: int) -> None:
        """Drop what was written after the save: the first ``n`` complete lines remain."""
        if not os.path.exists(self.results):
            return
        with open(self.results, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
        if len(lines) != n or (lines and not lines[-1].endswith("\n")):
            kept = "".join(line for line in lines[:n] if line.endswith("\n"))
            outputs.write_text(self.results, kept, overwrite=True)

    def save(self, state: dict) -> None:
        state = {"version": STATE_VERSION, "args": self.args,
                 "records": self.records_written(), **state}
        outputs.atomic_write(self.path, lambda p: torch.save(state, p), overwrite=True)

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)


class Stop:
    """Remembers a SIGTERM / SIGUSR2 until the current step is done (installed before the data
    loaders start their workers, which inherit it and so keep running until the state is
    saved). A context manager: the previous handlers come back on exit."""

    def __enter__(self) -> "Stop":
        self.signum = 0
        self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = signum


class Logged:
    """train.py's ``out.txt`` / ``err.txt`` (DomainBed's ``Tee``, appending); restores
    ``sys.stdout`` / ``sys.stderr`` on exit."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir

    def __enter__(self) -> None:
        from domainbed.lib import misc

        self.saved = sys.stdout, sys.stderr
        sys.stdout = misc.Tee(os.path.join(self.output_dir, "out.txt"))
        sys.stderr = misc.Tee(os.path.join(self.output_dir, "err.txt"))

    def __exit__(self, *exc) -> None:
        tees = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.saved
        for tee in tees:
            tee.file.close()


def next_batches(iterators: list, step: int, draws: dict, replay: bool = False) -> list:
    """One batch of each loader, in zip's order. The loaders' draws from torch's global random
    state are recorded in ``draws`` (``(step, loader)``: the state before), or, when
    ``replay``, the recorded states are restored before those draws happen again."""
    batches = []
    for i, iterator in enumerate(iterators):
        key = (step, i)
        if replay:
            if key in draws:
                torch.set_rng_state(draws[key])
            batches.append(next(iterator))
        else:
            before = torch.get_rng_state()
            batches.append(next(iterator))
            if not torch.equal(before, torch.get_rng_state()):
                draws[key] = before
    return batches


# --- the run --------------------------------------------------------------------------------


def _print_environment(args) -> None:
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


def run(args) -> int:
    for name in ("save_every", "eval_from", "member"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} {getattr(args, name)}: expected an integer >= 0")
    os.makedirs(args.output_dir, exist_ok=True)
    if os.path.exists(os.path.join(args.output_dir, "done")):
        print(f"{args.output_dir} holds a finished run (a 'done' file): nothing to do")
        return 0
    resume = ResumeState(args.output_dir, args)
    saved = resume.load()
    if saved is not None:
        resume.keep_records(saved["records"])
    with Stop() as stop, Logged(args.output_dir):
        return train(args, resume, saved, stop)


def train(args, resume: ResumeState, saved: dict | None, stop: Stop) -> int:
    """train.py's body (after its output files are set up), resuming from ``saved``."""
    from domainbed import datasets
    from domainbed.lib import misc
    from domainbed.lib.fast_data_loader import FastDataLoader, InfiniteDataLoader

    _print_environment(args)
    hparams = train_hparams(args.algorithm, args.dataset, args.hparams_seed, args.trial_seed,
                            args.hparams)
    print("HParams:")
    for k, v in sorted(hparams.items()):
        print(f"\t{k}: {v}")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.dataset not in vars(datasets):
        raise ValueError(f"dataset {args.dataset!r}: expected one of {datasets.DATASETS}")
    dataset = vars(datasets)[args.dataset](args.data_dir, args.test_envs, hparams)
    in_splits, out_splits, uda_splits = split_envs(
        dataset, args.test_envs, hparams, args.holdout_fraction, args.trial_seed,
        args.uda_holdout_fraction)
    if args.task == "domain_adaptation" and len(uda_splits) == 0:
        raise ValueError("Not enough unlabeled samples for domain adaptation.")

    def infinite(splits: list) -> list:
        return [InfiniteDataLoader(dataset=env, weights=weights,
                                   batch_size=hparams["batch_size"],
                                   num_workers=dataset.N_WORKERS) for env, weights in splits]

    train_loaders = infinite([s for i, s in enumerate(in_splits) if i not in args.test_envs])
    uda_loaders = infinite(uda_splits)
    eval_loaders = [FastDataLoader(dataset=env, batch_size=64, num_workers=dataset.N_WORKERS)
                    for env, _ in (in_splits + out_splits + uda_splits)]
    eval_names = ([f"env{i}_in" for i in range(len(in_splits))]
                  + [f"env{i}_out" for i in range(len(out_splits))]
                  + [f"env{i}_uda" for i in range(len(uda_splits))])

    algorithm = algorithm_class(args.algorithm)(
        dataset.input_shape, dataset.num_classes, len(dataset) - len(args.test_envs), hparams)
    train_iterators = [iter(loader) for loader in train_loaders]
    uda_iterators = [iter(loader) for loader in uda_loaders]
    steps_per_epoch = min(len(env) / hparams["batch_size"] for env, _ in in_splits)
    n_steps = args.steps or dataset.N_STEPS
    checkpoint_freq = args.checkpoint_freq or dataset.CHECKPOINT_FREQ

    draws: dict = {}
    start_step, checkpoint_vals, last_results_keys = 0, collections.defaultdict(list), None
    if saved is not None:
        algorithm.load_state_dict(saved["algorithm"])
    algorithm.to(device)
    if saved is not None:
        for name, optimizer in optimizers(algorithm).items():
            optimizer.load_state_dict(saved["optimizers"][name])
        draws = {(s, i): state for s, i, state in saved["draws"]}
        start_step = saved["step"]
        print(f"Resuming from step {start_step} ({resume.path}): replaying the data loaders")
        for step in range(start_step):
            next_batches(train_iterators, step, draws, replay=True)
            if args.task == "domain_adaptation":
                next_batches(uda_iterators, step, draws, replay=True)
        set_rng_state(saved["rng"])
        checkpoint_vals.update(saved["checkpoint_vals"])
        last_results_keys = saved["last_results_keys"]

    def save_state(next_step: int) -> None:
        resume.save({"step": next_step, "algorithm": algorithm.state_dict(),
                     "optimizers": {n: o.state_dict() for n, o in optimizers(algorithm).items()},
                     "rng": rng_state(), "draws": [[s, i, t] for (s, i), t in draws.items()],
                     "checkpoint_vals": dict(checkpoint_vals),
                     "last_results_keys": last_results_keys})

    def save_checkpoint(filename: str) -> None:
        if args.skip_model_save:
            return
        ckpt = {"args": recorded_args(args), "model_input_shape": dataset.input_shape,
                "model_num_classes": dataset.num_classes,
                "model_num_domains": len(dataset) - len(args.test_envs),
                "model_hparams": hparams, "model_dict": algorithm.state_dict()}
        outputs.atomic_write(os.path.join(args.output_dir, filename),
                             lambda p: torch.save(ckpt, p), overwrite=True)

    for step in range(start_step, n_steps):
        step_start_time = time.time()
        minibatches = [(x.to(device), y.to(device))
                       for x, y in next_batches(train_iterators, step, draws)]
        uda = ([x.to(device) for x, _ in next_batches(uda_iterators, step, draws)]
               if args.task == "domain_adaptation" else None)
        step_vals = algorithm.update(minibatches, uda)
        checkpoint_vals["step_time"].append(time.time() - step_start_time)
        for key, val in step_vals.items():
            checkpoint_vals[key].append(val)

        last = step == n_steps - 1
        if step % checkpoint_freq == 0 or last:
            if step >= args.eval_from or last:
                results = {"step": step, "epoch": step / steps_per_epoch}
                for key, val in checkpoint_vals.items():
                    results[key] = np.mean(val)
                for name, loader in zip(eval_names, eval_loaders):
                    results[name + "_acc"] = misc.accuracy(algorithm, loader, None, device)
                results["mem_gb"] = torch.cuda.max_memory_allocated() / (1024.0 * 1024.0 * 1024.0)
                results_keys = sorted(results.keys())
                if results_keys != last_results_keys:
                    misc.print_row(results_keys, colwidth=12)
                    last_results_keys = results_keys
                misc.print_row([results[key] for key in results_keys], colwidth=12)
                results.update({"hparams": hparams, "args": recorded_args(args)})
                with open(os.path.join(args.output_dir, "results.jsonl"), "a") as f:
                    f.write(json.dumps(results, sort_keys=True) + "\n")
                if args.save_model_every_checkpoint:
                    save_checkpoint(f"model_step{step}.pkl")
            checkpoint_vals = collections.defaultdict(list)

        if stop.signum and not last:
            save_state(step + 1)
            print(f"Stopped by signal {stop.signum} after step {step}; state saved to "
                  f"{resume.path}: run the same command to continue")
            return 128 + stop.signum
        if args.save_every and (step + 1) % args.save_every == 0 and not last:
            save_state(step + 1)

    save_checkpoint("model.pkl")
    with open(os.path.join(args.output_dir, "done"), "w") as f:
        f.write("done")
    resume.remove()
    return 0


if __name__ == "__main__":
    from domainbed_gaqat.cli import run_as_module

    run_as_module("train")
