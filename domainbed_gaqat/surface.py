"""Loss surfaces along filter-normalised random directions (paper Figure 6; Li et al. 2018).

For one or two ``model.pkl`` (e.g. SAGM_LSQ and GAQAT, side by side), the test-domain loss
``L(w + a * d1 + b * d2)`` on a grid of ``(a, b)``, in eval mode, moving the **latent
weights only**: quantizer scales and BatchNorm running statistics stay fixed (the quantizers
re-quantize the moved weights with the learned scales). Directions are drawn from a normal
distribution and filter-normalised (Li et al. 2018, sec. 4): each filter of a conv weight
(``d[i]``, one output channel) and each output unit of the linear classifier is rescaled to
the norm of the corresponding weight filter, ``d[i] <- d[i] * ||w[i]|| / ||d[i]||``.
One-dimensional parameters (BatchNorm affine weights/biases, biases) get a zero direction,
Li et al.'s ``ignore='biasbn'`` option (default, ``--bn_bias zero``), or with
``--bn_bias weight`` the parameter itself (their code's default). The same random draw (seed)
is normalised to each checkpoint's own weights.

    gaqat surface runs/sagm_lsq/model.pkl runs/gaqat/model.pkl \\
        --labels SAGM+LSQ GAQAT --data_dir data --output_dir surface/art
"""

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from domainbed_gaqat import options
from domainbed_gaqat.experiments import outputs
from domainbed_gaqat.plugin.data import Data, default_device, load_batches
from domainbed_gaqat.plugin.model_files import load_algorithm
from domainbed_gaqat.progress import track
from domainbed_gaqat.quant.modules import quantizers

BN_BIAS = ("zero", "weight")


def latent_weights(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter except the quantizer scales."""
    scale_ids = {id(q.scale) for _, q in quantizers(module)}
    return [(n, p) for n, p in module.named_parameters() if id(p) not in scale_ids]


def filter_normalized_direction(weights: Sequence[torch.Tensor], generator: torch.Generator,
                                bn_bias: str = "zero") -> list[torch.Tensor]:
    """A random direction, filter-normalised to ``weights`` (see module docstring)."""
    if bn_bias not in BN_BIAS:
        raise ValueError(f"bn_bias {bn_bias!r}: expected one of {BN_BIAS}")
    direction = []
    for w in weights:
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w)
        if w.dim() <= 1:
            d = torch.zeros_like(w) if bn_bias == "zero" else w.detach().clone()
        else:
            dims = tuple(range(1, w.dim()))
            w_norm = torch.linalg.vector_norm(w.detach(), dim=dims, keepdim=True)
            d_norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
            d = d * (w_norm / (d_norm + 1e-10))
        direction.append(d)
    return direction


@torch.no_grad()
def loss_and_accuracy(algorithm: nn.Module, batches) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``batches`` (algorithm in eval mode), summed on
    the device and read by the host once."""
    total, n = 0.0, 0
    for x, y in batches:
        logits = algorithm.predict(x)
        total = total + torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                     (logits.argmax(1) == y).sum().double()])
        n += len(y)
    loss, correct = total.tolist()
    return loss / n, correct / n


def coordinates(extent: float, points: int) -> np.ndarray:
    """``points`` coordinates from ``-extent`` to ``extent``; odd ``points`` include 0 exactly."""
    if points < 2 or extent <= 0:
        raise ValueError(f"{points} coordinates over +-{extent}: expected points >= 2 and "
                         "extent > 0")
    half = (points - 1) / 2
    return extent * (np.arange(points) - half) / half


@torch.no_grad()
def surface(algorithm: nn.Module, batches, alphas: np.ndarray, betas: np.ndarray | None,
            seed: int = 0, bn_bias: str = "zero",
            progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(loss, accuracy)`` at ``w + a * d1 (+ b * d2)``: arrays of shape ``[len(alphas)]``
    (1-D, ``betas`` None) or ``[len(alphas), len(betas)]``. Weights are restored after."""
    algorithm.eval()
    params = [p for _, p in latent_weights(algorithm)]
    generator = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(params, generator, bn_bias)
    d2 = filter_normalized_direction(params, generator, bn_bias) if betas is not None else None
    base = [p.detach().clone() for p in params]
    points = [(i, a, j, b) for i, a in enumerate(alphas)
              for j, b in (enumerate(betas) if betas is not None else [(None, 0.0)])]
    shape = (len(alphas),) if betas is None else (len(alphas), len(betas))
    loss, acc = np.full(shape, np.nan), np.full(shape, np.nan)
    try:
        for i, a, j, b in track(points, f"surface {len(shape)}-D", enabled=progress):
            for k, p in enumerate(params):
                moved = base[k] + float(a) * d1[k]
                if d2 is not None:
                    moved = moved + float(b) * d2[k]
                p.copy_(moved)
            index = (i,) if j is None else (i, j)
            loss[index], acc[index] = loss_and_accuracy(algorithm, batches)
    finally:
        for p, w in zip(params, base):
            p.copy_(w)
    return loss, acc


# --- figures -------------------------------------------------------------------------------


def figure_1d(alphas: np.ndarray, losses: dict[str, np.ndarray], title: str) -> Figure:
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    for label, loss in losses.items():
        ax.plot(alphas, loss, "-o", ms=3, label=label)
    ax.set_xlabel("alpha (filter-normalised direction)")
    ax.set_ylabel("test-domain loss")
    ax.legend()
    ax.set_title(title)
    return fig


def figure_2d(alphas: np.ndarray, betas: np.ndarray, losses: dict[str, np.ndarray],
              title: str) -> Figure:
    """Figure 6: a 3-D surface (top) and contours (bottom) per checkpoint, shared z-range."""
    fig = Figure(figsize=(5 * len(losses), 9), layout="constrained")
    lo = min(np.nanmin(v) for v in losses.values())
    hi = max(np.nanmax(v) for v in losses.values())
    b, a = np.meshgrid(betas, alphas)
    levels = np.linspace(lo, hi, 15) if hi > lo else None
    for col, (label, loss) in enumerate(losses.items()):
        ax = fig.add_subplot(2, len(losses), col + 1, projection="3d")
        ax.plot_surface(a, b, loss, cmap="viridis", vmin=lo, vmax=hi, linewidth=0)
        ax.set_zlim(lo, hi if hi > lo else lo + 1)
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
        ax.set_title(label)
        ax2 = fig.add_subplot(2, len(losses), len(losses) + col + 1)
        contour = ax2.contour(a, b, loss, levels=levels, cmap="viridis")
        ax2.clabel(contour, fontsize=6)
        ax2.set_xlabel("alpha")
        ax2.set_ylabel("beta")
    fig.suptitle(title)
    return fig


# --- command line --------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("models", nargs="+", help="one or two DomainBed model.pkl")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="default: each run's algorithm")
    options.checkpoint_data(parser)
    parser.add_argument("--env", type=int, default=None,
                        help="env to evaluate (default: the first test env)")
    parser.add_argument("--split", choices=("in", "out", "full"), default="in",
                        help="split of that env: 'in' is DomainBed's test split")
    parser.add_argument("--max_samples", type=options.positive_int, default=None)
    parser.add_argument("--dims", choices=("1", "2", "both"), default="both")
    parser.add_argument("--extent", type=float, default=1.0,
                        help="coordinates from -extent to extent")
    parser.add_argument("--points", type=int, default=21,
                        help="1-D coordinates (odd includes 0)")
    parser.add_argument("--points_2d", type=int, default=11, help="2-D coordinates per axis")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    parser.add_argument("--bn_bias", choices=BN_BIAS, default="zero")
    options.device(parser)
    options.output(parser)
    options.quiet(parser)


def run(args) -> int:
    if len(args.models) > 2:
        raise ValueError(f"{len(args.models)} models given: expected one or two model.pkl")
    labels = args.labels
    if labels is not None and len(labels) != len(args.models):
        raise ValueError(f"--labels {labels}: expected {len(args.models)} labels, one a model")
    if labels is not None and len(set(labels)) != len(labels):
        raise ValueError(f"--labels {labels}: expected distinct labels")
    dims = ["1", "2"] if args.dims == "both" else [args.dims]
    names = [f"surface_{d}d" for d in dims]
    targets = [os.path.join(args.output_dir, f"{n}.{ext}") for n in names
               for ext in ("csv", "parquet", "png")] + [os.path.join(args.output_dir,
                                                                      "surface.npz")]
    outputs.check_new(targets, args.overwrite)
    alphas = coordinates(args.extent, args.points)
    alphas_2d = coordinates(args.extent, args.points_2d)
    device = args.device or default_device()

    results = {"alphas_1d": alphas, "alphas_2d": alphas_2d, "betas_2d": alphas_2d}
    rows_1d, rows_2d, loss_1d, loss_2d = [], [], {}, {}
    data, title = None, ""
    for m, path in enumerate(args.models):
        algorithm, ckpt = load_algorithm(path, device)
        label = labels[m] if labels else f"{ckpt['args']['algorithm']} ({m})"
        if data is None:
            data = Data.from_checkpoint(ckpt, args.dataset, args.data_dir,
                                                 args.test_envs)
            env = args.env if args.env is not None else data.test_envs[0]
            batches = load_batches(data.split(env, args.split), args.max_samples, device)
            title = f"{ckpt['args'].get('dataset', args.dataset)} env {env} ({args.split})"
        if "1" in dims:
            loss, acc = surface(algorithm, batches, alphas, None, args.seed, args.bn_bias,
                                not args.quiet)
            loss_1d[label] = loss
            results[f"loss_1d_{m}"], results[f"acc_1d_{m}"] = loss, acc
            rows_1d += [{"model": label, "path": path, "alpha": a, "loss": v, "acc": c}
                        for a, v, c in zip(alphas, loss, acc)]
        if "2" in dims:
            loss, acc = surface(algorithm, batches, alphas_2d, alphas_2d, args.seed,
                                args.bn_bias, not args.quiet)
            loss_2d[label] = loss
            results[f"loss_2d_{m}"], results[f"acc_2d_{m}"] = loss, acc
            rows_2d += [{"model": label, "path": path, "alpha": a, "beta": b,
                         "loss": loss[i, j], "acc": acc[i, j]}
                        for i, a in enumerate(alphas_2d) for j, b in enumerate(alphas_2d)]
    results["labels"] = np.array(list(loss_1d or loss_2d))

    paths = []
    for d, rows in (("1", rows_1d), ("2", rows_2d)):
        if d in dims:
            paths += outputs.write_table(pd.DataFrame(rows),
                                          os.path.join(args.output_dir, f"surface_{d}d"),
                                          args.overwrite)
    if "1" in dims:
        paths.append(outputs.save_figure(figure_1d(alphas, loss_1d, title),
                                          os.path.join(args.output_dir, "surface_1d.png"),
                                          args.overwrite))
    if "2" in dims:
        paths.append(outputs.save_figure(figure_2d(alphas_2d, alphas_2d, loss_2d, title),
                                          os.path.join(args.output_dir, "surface_2d.png"),
                                          args.overwrite))
    paths.append(outputs.atomic_write(os.path.join(args.output_dir, "surface.npz"),
                                       lambda p: np.savez(p, **results), args.overwrite))
    outputs.finish(paths)
    return 0


if __name__ == "__main__":
    from domainbed_gaqat.cli import run_as_module

    run_as_module("surface")
