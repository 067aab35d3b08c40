"""Scale perturbation probe (paper Table 1).

Multiplies chosen quantizer scales of a trained ``model.pkl`` by factors (default 0.8, 0.9,
1.1, 1.2) and reports, per setting, the in-domain accuracy (mean over the training domains'
validation splits ``env{i}_out``, the paper's "val") and the out-of-domain accuracy (the test
envs' ``env{t}_in`` splits, DomainBed's test accuracy), on the splits train.py made. Each
scale is perturbed on its own (one table row per scale, as Table 1) unless ``--joint``; the
scales are restored exactly after each setting.

    gaqat probe runs/gaqat/model.pkl --data_dir data \\
        --layers layer3.0.conv1 layer1.0.conv1 --kind both --output_dir probe/gaqat
"""

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pandas as pd
import torch
from torch import nn

from domainbed_gaqat import options
from domainbed_gaqat.experiments import outputs
from domainbed_gaqat.plugin.data import Data, default_device
from domainbed_gaqat.plugin.featurizer import scale_label
from domainbed_gaqat.plugin.model_files import load_algorithm, require_quantized
from domainbed_gaqat.progress import track
from domainbed_gaqat.quant.modules import LSQQuantizer, quantizers

DEFAULT_FACTORS = (0.8, 0.9, 1.1, 1.2)
DEFAULT_LAYERS = ("layer3.0.conv1", "layer1.0.conv1")  # the rows of Table 1
KINDS = {"w": ("w",), "a": ("a",), "both": ("w", "a")}


def select_quantizers(module: nn.Module, layers: Sequence[str],
                      kind: str = "both") -> list[tuple[str, LSQQuantizer]]:
    """Quantizers whose layer name (e.g. ``layer3.0.conv1``; the stem is ``conv1``) fully
    matches one of the regexes ``layers``, of kind ``w`` (weights), ``a`` (activations) or
    ``both``; in forward order."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {list(KINDS)}")
    patterns = [re.compile(p) for p in layers]
    found = [(n, q) for n, q in quantizers(module)
             if scale_label(n)[-1] in KINDS[kind]
             and any(p.fullmatch(scale_label(n)[:-2]) for p in patterns)]
    if not found:
        names = list(dict.fromkeys(scale_label(n)[:-2] for n, _ in quantizers(module)))
        raise ValueError(f"layers {list(layers)} (kind {kind!r}) match no quantizer; layer "
                         f"names are e.g. {names[:4]} ... {names[-2:]}")
    return found


@contextmanager
def perturbed(quantizer_list: Sequence[LSQQuantizer], factor: float) -> Iterator[None]:
    """Multiply the scales of ``quantizer_list`` by ``factor``; restore them bit-exactly."""
    if not factor > 0:
        raise ValueError(f"scale factor {factor!r}: expected a positive number")
    saved = [q.scale.detach().clone() for q in quantizer_list]
    try:
        with torch.no_grad():
            for q in quantizer_list:
                q.scale.mul_(factor)
        yield
    finally:
        with torch.no_grad():
            for q, s in zip(quantizer_list, saved):
                q.scale.copy_(s)


def probe(algorithm: nn.Module, data: Data, selected: Sequence[tuple[str, LSQQuantizer]],
          factors: Sequence[float], device: str, joint: bool = False,
          progress: bool = True) -> pd.DataFrame:
    """One row per setting: ``origin`` (unperturbed), then each scale (or all jointly) times
    each factor; columns ``id_acc``, ``ood_acc`` and each split's accuracy."""
    settings = ([("joint", [q for _, q in selected])] if joint
                else [(scale_label(n), [q]) for n, q in selected])
    jobs = [("origin", [], 1.0)] + [(name, qs, f) for name, qs in settings for f in factors]
    rows = []
    algorithm.eval()
    for name, qs, factor in track(jobs, "probe", enabled=progress):
        with perturbed(qs, factor):
            accs = data.accuracies(algorithm, device)
        rows.append({"scale": name, "factor": factor, **accs})
    df = pd.DataFrame(rows)
    origin = df.iloc[0]
    df["id_delta"] = df["id_acc"] - origin["id_acc"]
    df["ood_delta"] = df["ood_acc"] - origin["ood_acc"]
    return df


def markdown_table(df: pd.DataFrame) -> str:
    """Table 1 layout: a row per scale, ``ID / OOD`` accuracy (%) per factor."""
    origin = df[df["scale"] == "origin"].iloc[0]
    factors = list(dict.fromkeys(df.loc[df["scale"] != "origin", "factor"]))

    def cell(row) -> str:
        return f"{100 * row['id_acc']:.2f} / {100 * row['ood_acc']:.2f}"

    head = ["scale", "origin"] + [f"{100 * f:g}%" for f in factors]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scale, rows in df[df["scale"] != "origin"].groupby("scale", sort=False):
        by_factor = {r["factor"]: cell(r) for _, r in rows.iterrows()}
        lines.append("| " + " | ".join([scale, cell(origin)]
                                       + [by_factor[f] for f in factors]) + " |")
    return "\n".join(lines) + "\n\nCells: in-domain (training-domain validation) / " \
                               "out-of-domain (test env) accuracy, %.\n"


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a DomainBed model.pkl of a quantized algorithm")
    options.checkpoint_data(parser)
    parser.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS),
                        help="regexes fully matching layer names, e.g. 'layer3.0.conv1' "
                        "'layer4.*'")
    parser.add_argument("--kind", choices=list(KINDS), default="both")
    parser.add_argument("--factors", type=float, nargs="+", default=list(DEFAULT_FACTORS))
    parser.add_argument("--joint", action="store_true", help="perturb all chosen scales together")
    options.device(parser)
    options.output(parser)
    options.quiet(parser)


def run(args) -> int:
    bad = [f for f in args.factors if not f > 0]
    if bad:
        raise ValueError(f"--factors {bad}: expected positive numbers")
    paths = [os.path.join(args.output_dir, f) for f in ("probe.md", "probe.csv", "probe.parquet")]
    outputs.check_new(paths, args.overwrite)
    device = args.device or default_device()
    algorithm, ckpt = load_algorithm(args.model, device)
    require_quantized(ckpt, args.model)
    selected = select_quantizers(algorithm, args.layers, args.kind)
    data = Data.from_checkpoint(ckpt, args.dataset, args.data_dir, args.test_envs)
    df = probe(algorithm, data, selected, args.factors, device, args.joint,
               progress=not args.quiet)
    table = markdown_table(df)
    print(table)
    written = [outputs.write_text(paths[0], table, args.overwrite)]
    written += outputs.write_table(df, os.path.join(args.output_dir, "probe"), args.overwrite)
    outputs.finish(written)
    return 0


if __name__ == "__main__":
    from domainbed_gaqat.cli import run_as_module

    run_as_module("probe")
