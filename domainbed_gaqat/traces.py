"""Scale-gradient traces: paper Figures 2 and 5 (g_task vs g_smooth), 3 (disorder), 4 (freezing).

Trains an algorithm on a DomainBed dataset exactly as ``train.py`` does and records, for every
quantizer scale, the gradients summed over blocks of ``M`` steps: ``g_task`` (clean pass),
``g_smooth`` (perturbed pass; SAGM_LSQ / GAQAT only) and the gradient the optimizer applied;
the task and smooth gradient disorder (Definition 3.1) over windows of ``K`` steps, one
:class:`~domainbed_gaqat.optim.freezing.DisorderTracker` per stream; and, for GAQAT, how many steps
of each block the scale was frozen. Nothing in the algorithm changes: the gradients come from
its scale-gradient hook.

    gaqat traces --algorithm GAQAT --dataset PACS --data_dir data \\
        --test_envs 0 --steps 7000 --every 350 --K 350 --output_dir traces/gaqat_w4
"""

import json
import os
import random
import re

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from domainbed_gaqat import options
from domainbed_gaqat.experiments import outputs
from domainbed_gaqat.optim.freezing import DisorderTracker
from domainbed_gaqat.plugin.data import Data, default_device
from domainbed_gaqat.plugin.featurizer import scale_label
from domainbed_gaqat.plugin.hparams import train_hparams
from domainbed_gaqat.plugin.model_files import checkpoint_dict
from domainbed_gaqat.plugin.registry import algorithm_class, quantized_algorithms
from domainbed_gaqat.progress import track
from domainbed_gaqat.quant.modules import quantizers

GROUPS = ("stem", "layer1", "layer2", "layer3", "layer4")
SUMS = ("g_task", "g_smooth", "g_applied", "frozen_steps")  # per block, in observe's order
TABLES = ("grads", "disorder")
FIGURES = ("gradients.png", "disorder.png", "freezing.png")


def layer_group(label: str) -> str:
    """Panel of a scale: ``layer3.0.conv1 w`` -> ``layer3``; the first conv -> ``stem``."""
    head = label.split(".", 1)[0]
    return head if head in GROUPS else "stem"


class TraceRecorder:
    """Records each update's scale gradients on an algorithm, through its scale-gradient hook.

    ``rows`` get one entry per scale and block of ``every`` steps (the last block may be
    shorter); ``disorder_rows`` one per scale, stream and closed window of ``K`` steps.
    Call :meth:`close` to remove the hook (and flush a partial block). The trackers and the
    block sums live on the algorithm's device; the host reads them once per block, when it is
    flushed (windows closed within a block are read then too): no host sync per step.
    """

    def __init__(self, algorithm: nn.Module, every: int, K: int) -> None:
        named = list(quantizers(algorithm))
        spec = getattr(algorithm, "SPEC", None)
        if not named or spec is None or not spec.quantized:
            raise ValueError(f"{type(algorithm).__name__} has no quantizer scales: expected a "
                             f"quantized algorithm ({', '.join(quantized_algorithms())})")
        if any(q.scale.dim() for _, q in named):
            raise ValueError(f"{type(algorithm).__name__} has per-channel scales: the traces "
                             "follow one scale per tensor (the paper's Figs 2-5)")
        if every < 1:
            raise ValueError(f"every (M) must be >= 1, got {every!r}")
        self.algorithm, self.every, self.scales = algorithm, every, list(algorithm.scales)
        self.labels = [scale_label(n) for n, _ in named]
        self.names = [n for n, _ in named]
        n, device = len(named), self.scales[0].device
        self.split = "sagm" in spec.families  # two gradient streams
        self.freezing = "gaqat" in spec.families
        self.trackers = {"task": DisorderTracker(n, K, device)}
        if self.split:
            self.trackers["smooth"] = DisorderTracker(n, K, device)
        self.step, self.rows, self.disorder_rows = 0, [], []
        self._sums = torch.zeros(len(SUMS), n, dtype=torch.float64, device=device)
        self._block_steps = 0
        self._windows: list[tuple[str, int, torch.Tensor]] = []  # closed, not yet read
        self._hook = algorithm.register_scale_gradient_hook(
            lambda g: self.observe(g.task, g.smooth, g.applied, g.frozen))

    @torch.no_grad()
    def observe(self, g_task: torch.Tensor, g_smooth: torch.Tensor | None,
                applied: torch.Tensor, frozen: torch.Tensor | None) -> None:
        """Add one update's gradients (``frozen``: the flags in effect for this update)."""
        for row, value in enumerate((g_task, g_smooth, applied, frozen)):
            if value is not None:
                self._sums[row] += value
        self.step += 1
        self._block_steps += 1
        for stream, grad in (("task", g_task), ("smooth", g_smooth)):
            if stream in self.trackers and self.trackers[stream].observe(grad):
                self._windows.append((stream, self.step,
                                      self.trackers[stream].disorder.clone()))
        if self._block_steps == self.every:
            self._flush()

    def _record_disorder(self, stream: str, step: int, values: list[float]) -> None:
        window = sum(r["stream"] == stream for r in self.disorder_rows) // len(self.names) + 1
        for name, label, value in zip(self.names, self.labels, values):
            self.disorder_rows.append({"step": step, "window": window, "quantizer": name,
                                       "label": label, "group": layer_group(label),
                                       "kind": label[-1], "stream": stream, "disorder": value})

    def _flush(self) -> None:
        """Read the block (and the windows closed in it) on the host, in one copy."""
        if self._block_steps == 0:
            return
        block = len(self.rows) // len(self.names) + 1
        host = torch.cat([self._sums, torch.stack(self.scales).double()[None],
                          *(d.double()[None] for _, _, d in self._windows)]).tolist()
        columns, scales = dict(zip(SUMS, host)), host[len(SUMS)]
        for (stream, step, _), values in zip(self._windows, host[len(SUMS) + 1:]):
            self._record_disorder(stream, step, values)
        for i, (name, label) in enumerate(zip(self.names, self.labels)):
            self.rows.append({
                "step": self.step, "block": block, "steps_in_block": self._block_steps,
                "quantizer": name, "label": label, "group": layer_group(label),
                "kind": label[-1], "scale": scales[i], "g_task": columns["g_task"][i],
                "g_smooth": columns["g_smooth"][i] if self.split else float("nan"),
                "g_applied": columns["g_applied"][i],
                "frozen_steps": (columns["frozen_steps"][i] if self.freezing
                                 else float("nan"))})
        self._sums.zero_()
        self._block_steps, self._windows = 0, []

    def close(self) -> None:
        """Flush a partial block and remove the hook."""
        self._flush()
        self._hook.remove()

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(grads, disorder)`` tidy tables."""
        return pd.DataFrame(self.rows), pd.DataFrame(self.disorder_rows, columns=[
            "step", "window", "quantizer", "label", "group", "kind", "stream", "disorder"])


def record_traces(algorithm: nn.Module, minibatches, steps: int, every: int, K: int,
                  progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run ``steps`` updates of ``algorithm`` on ``minibatches`` (an iterable of DomainBed
    minibatch lists) and return the ``(grads, disorder)`` traces."""
    recorder = TraceRecorder(algorithm, every, K)
    try:
        batches = iter(minibatches)
        for _ in track(range(steps), "traces", enabled=progress):
            algorithm.update(next(batches))
    finally:
        recorder.close()
    return recorder.frames()


# --- figures -------------------------------------------------------------------------------


def _groups(df: pd.DataFrame) -> list[str]:
    return [g for g in GROUPS if g in set(df["group"])]


def _panels(df: pd.DataFrame, title: str, ylabel: str) -> tuple[Figure, list]:
    """One panel per layer group, two panels a row, legends to the right of each panel."""
    groups = _groups(df)
    rows = -(-len(groups) // 2)
    fig = Figure(figsize=(16, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    for ax in axes[:len(groups)]:
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("step")
    fig.suptitle(title)
    return fig, list(zip(groups, axes))


def _legend(ax, n: int) -> None:
    ax.legend(fontsize=6, ncol=1 if n <= 16 else 2, loc="upper left", bbox_to_anchor=(1.01, 1))


def _colors(labels) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {label: cmap(i % 20) for i, label in enumerate(labels)}


def figure_gradients(grads: pd.DataFrame, title: str) -> Figure:
    """Figures 2/5: per-block sums of ``g_task`` (solid) and ``g_smooth`` (dashed) per scale."""
    has_smooth = grads["g_smooth"].notna().any()
    ylabel = "block sum: g_task (solid)" + (", g_smooth (dashed)" if has_smooth else "")
    fig, panels = _panels(grads, title, ylabel)
    for group, ax in panels:
        sub = grads[grads["group"] == group]
        colors = _colors(sub["label"].unique())
        for label, rows in sub.groupby("label", sort=False):
            ax.plot(rows["step"], rows["g_task"], "-o", ms=2, lw=1, color=colors[label],
                    label=label)
            if has_smooth:
                ax.plot(rows["step"], rows["g_smooth"], "--", lw=1, color=colors[label])
        ax.axhline(0.0, color="0.6", lw=0.5)
        ax.set_title(group)
        _legend(ax, len(colors))
    return fig


def figure_disorder(disorder: pd.DataFrame, title: str) -> Figure:
    """Figure 3: task (solid) and smooth (dashed) gradient disorder per window of K steps."""
    fig, panels = _panels(disorder, title, "disorder: task (solid), smooth (dashed)")
    for group, ax in panels:
        sub = disorder[disorder["group"] == group]
        colors = _colors(sub["label"].unique())
        for (label, stream), rows in sub.groupby(["label", "stream"], sort=False):
            ax.plot(rows["step"], rows["disorder"], "-o" if stream == "task" else "--", ms=2,
                    lw=1, color=colors[label], label=label if stream == "task" else None)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(group)
        _legend(ax, len(colors))
    return fig


def figure_freezing(grads: pd.DataFrame, title: str) -> Figure:
    """Figure 4, one row per layer group: left, the fraction of each block a scale was frozen;
    right, the applied scale gradients (block sums), crosses on blocks where the scale was
    frozen (then updated by ``g_smooth`` only)."""
    groups = _groups(grads)
    fig = Figure(figsize=(16, 3.6 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 2, squeeze=False, width_ratios=(1, 1.6))
    for (left, right), group in zip(axes, groups):
        sub = grads[grads["group"] == group]
        labels = list(sub["label"].unique())
        frac = (sub["frozen_steps"] / sub["steps_in_block"]).to_numpy()
        heat = frac.reshape(-1, len(labels)).T  # rows: scales, columns: blocks
        steps = sub["step"].unique()
        image = left.imshow(heat, aspect="auto", interpolation="nearest", cmap="Blues",
                            vmin=0, vmax=1, extent=(0, len(steps), len(labels) - 0.5, -0.5))
        left.set_yticks(range(len(labels)), labels, fontsize=6)
        ticks = np.arange(0, len(steps), max(1, len(steps) // 10))
        left.set_xticks(ticks + 0.5, [str(steps[i]) for i in ticks], fontsize=6)
        left.set_xlabel("block (last step)")
        left.set_title(f"{group}: frozen fraction of each block", fontsize=9)
        fig.colorbar(image, ax=left, fraction=0.05)
        colors = _colors(labels)
        for label, rows in sub.groupby("label", sort=False):
            right.plot(rows["step"], rows["g_applied"], "-", lw=1, color=colors[label],
                       label=label)
            frozen = rows[rows["frozen_steps"] > 0]
            right.plot(frozen["step"], frozen["g_applied"], "x", ms=4, color=colors[label])
        right.axhline(0.0, color="0.6", lw=0.5)
        right.set_xlabel("step")
        right.set_ylabel("applied gradient, block sum (x: frozen)", fontsize=8)
        right.set_title(f"{group}: applied scale gradients", fontsize=9)
        _legend(right, len(labels))
    fig.suptitle(title)
    return fig


def write_outputs(grads: pd.DataFrame, disorder: pd.DataFrame, output_dir: str, title: str,
                  select: str | None = None, overwrite: bool = False) -> list[str]:
    """Tables (CSV, Parquet) and PNG figures; ``select`` (a regex on labels) limits the
    scales drawn, never the tables."""
    paths = []
    for name, df in zip(TABLES, (grads, disorder)):
        paths += outputs.write_table(df, os.path.join(output_dir, name), overwrite)
    if select:
        pattern = re.compile(select)
        grads = grads[grads["label"].map(lambda s: bool(pattern.search(s)))]
        disorder = disorder[disorder["label"].map(lambda s: bool(pattern.search(s)))]
        if grads.empty:
            raise ValueError(f"--select {select!r} matches no scale label (e.g. "
                             "'layer3.0.conv1 w')")
    figures = [("gradients.png", figure_gradients, grads)]
    if not disorder.empty:
        figures.append(("disorder.png", figure_disorder, disorder))
    if grads["frozen_steps"].notna().any():
        figures.append(("freezing.png", figure_freezing, grads))
    for name, draw, df in figures:
        paths.append(outputs.save_figure(draw(df, title), os.path.join(output_dir, name),
                                          overwrite))
    return paths


# --- command line --------------------------------------------------------------------------


def add_arguments(parser) -> None:
    options.run_identity(parser, algorithm="GAQAT", dataset="RotatedDigits")
    parser.add_argument("--steps", type=options.positive_int, default=1000)
    parser.add_argument("--every", type=options.positive_int, default=None,
                        help="M: sum gradients over blocks of M steps (default: K)")
    parser.add_argument("--K", type=int, default=None,
                        help="disorder window (default: the gaqat_K hparam, else 350)")
    parser.add_argument("--select", default=None, help="regex on scale labels to draw (e.g. "
                        "'layer3.0.conv1'); tables keep all")
    parser.add_argument("--save_model", action="store_true",
                        help="also write model.pkl in train.py's format")
    options.device(parser)
    options.output(parser)
    options.quiet(parser)


def run(args) -> int:
    device = args.device or default_device()
    hparams = train_hparams(args.algorithm, args.dataset, args.hparams_seed, args.trial_seed,
                            args.hparams)
    K = args.K if args.K is not None else hparams.get("gaqat_K", 350)
    if not isinstance(K, int) or K < 2:
        raise ValueError(f"--K {K!r}: the disorder window must be an integer >= 2")
    every = args.every or K
    paths = [os.path.join(args.output_dir, f) for f in
             [f"{t}.{ext}" for t in TABLES for ext in ("csv", "parquet")] + list(FIGURES)
             + ["meta.json"] + (["model.pkl"] if args.save_model else [])]
    outputs.check_new(paths, args.overwrite)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    data = Data(args.dataset, args.data_dir, args.test_envs, hparams, args.holdout_fraction,
                args.trial_seed)
    algorithm = algorithm_class(args.algorithm)(
        data.dataset.input_shape, data.dataset.num_classes, len(data.train_envs), hparams)
    algorithm.to(device)
    TraceRecorder(algorithm, every, K).close()  # fail early on an unquantized algorithm
    minibatches = ([(x.to(device), y.to(device)) for x, y in batch]
                   for batch in data.minibatches())
    grads, disorder = record_traces(algorithm, minibatches, args.steps, every, K,
                                    progress=not args.quiet)

    bits = f"W{hparams['w_bits']}A{hparams['a_bits']}"
    title = (f"{args.algorithm} {bits}, {args.dataset} test env {args.test_envs}, "
             f"M={every}, K={K}")
    written = write_outputs(grads, disorder, args.output_dir, title, args.select,
                            args.overwrite)
    meta = {"args": vars(args), "hparams": hparams, "every": every, "K": K,
            "quantizers": list(dict.fromkeys(grads["quantizer"]))}
    written.append(outputs.write_text(os.path.join(args.output_dir, "meta.json"),
                                      json.dumps(meta, indent=1), args.overwrite))
    if args.save_model:
        ckpt = checkpoint_dict(vars(args), data.dataset, args.test_envs, hparams, algorithm)
        written.append(outputs.atomic_write(os.path.join(args.output_dir, "model.pkl"),
                                            lambda p: torch.save(ckpt, p), args.overwrite))
    outputs.finish(written)
    return 0


if __name__ == "__main__":
    from domainbed_gaqat.cli import run_as_module

    run_as_module("traces")
