"""The measured sizes of docs/seed-systems.md: where this project's QT-DoG and SAQ differ from
their releases, by how much (CPU, minutes).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/seed_systems.py [--json out.json] [--parts saq]

1. QT-DoG's scale initialisation: MSE range search / the release's LSQ rule, per channel, on
   ResNet-50 at initialisation (no pretrained weights offline) at 7 bits.
2. QT-DoG's gradient scale: one channel's N (LSQ paper) / the whole tensor's (the release):
   sqrt(C_out) per conv of ResNet-50.
3. ``qtdog_release`` under torch < 2.0: the conv weights after ``quant_start`` with Adam's
   zero-gradient steps (``zero_grad(set_to_none=False)``) against fixed ones (torch >= 2.0):
   drift in quantization steps and integer codes changed, ResNet-18 on RotatedDigits.
4. SAQ with the activation scales perturbed (the release's ``include_aclip``) or not: one step
   on ResNet-18 W4A4, RotatedDigits: the scales' share of ``||g||``, their relative move, and
   how much the update's gradient changes (the same step twice: the control).
"""

import argparse
import json
import math
import statistics

import torch
from domainbed import algorithms, hparams_registry

import domainbed_gaqat
from domainbed_gaqat.plugin.algorithms import ERM_FP, QTDoG
from domainbed_gaqat.quant.modules import QuantConv2d, quantizers
from domainbed_gaqat.quant.range_init import lsq_init_scale, mse_scale


def rotated_digits_batches(n: int, size: int = 8) -> list:
    from domainbed import datasets

    dataset = datasets.RotatedDigits(None, [0], {})
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        batch = []
        for env in list(dataset)[1:]:
            idx = torch.randint(0, len(env), (size,), generator=g).tolist()
            batch.append((torch.stack([env[i][0] for i in idx]),
                          torch.tensor([env[i][1] for i in idx])))
        out.append(batch)
    return out


def build(name: str, **overrides):
    torch.manual_seed(0)
    hparams = hparams_registry.default_hparams(name, "RotatedDigits")
    hparams.update(overrides)
    return algorithms.get_algorithm_class(name)((3, 32, 32), 10, 5, hparams)


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def qtdog_init_and_grad_scale() -> dict:
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    ratios, grad_ratios = [], []
    for name, m in resnet.named_modules():
        if isinstance(m, torch.nn.Conv2d) and name != "conv1":
            w = m.weight.detach()
            mse = mse_scale(w, -64, 63, channel_axis=0).reshape(-1)
            lsq = lsq_init_scale(w, 63, channel_axis=0).reshape(-1)
            ratios += (mse / lsq).tolist()
            grad_ratios.append(math.sqrt(w.shape[0]))  # sqrt(N_tensor / N_channel)
    return {"init_mse_over_lsq": summary(ratios), "grad_channel_over_tensor": summary(grad_ratios)}


class QTDoGUnderOldTorch(QTDoG):
    """``qtdog_release`` as torch < 2.0 ran the release: ``zero_grad()`` left zero gradients
    (not None) on the conv weights still in the optimizer, so Adam kept stepping them; the
    scales (never in the release's optimizer) stay fixed."""

    def _before_optimizer_step(self) -> None:
        if self._steps >= self.hparams["quant_start"]:
            for p in self.fixed_after_start:
                p.grad = torch.zeros_like(p) if p.dim() == 4 else None
        ERM_FP._before_optimizer_step(self)


def qtdog_release_drift(start: int = 20, after: int = 100) -> dict:
    data = rotated_digits_batches(start + 1 + after)
    hparams = dict(hparams_registry.default_hparams("QTDoG", "RotatedDigits"),
                   quant_start=start, qtdog_release=True, batch_size=8)
    torch.manual_seed(0)
    fixed = QTDoG((3, 32, 32), 10, 5, hparams)
    for batch in data[:start + 1]:
        fixed.update(batch)
    old_torch = QTDoGUnderOldTorch((3, 32, 32), 10, 5, hparams)  # the same state at the start
    old_torch.load_state_dict(fixed.state_dict())
    old_torch.optimizer.load_state_dict(fixed.optimizer.state_dict())
    for batch in data[start + 1:]:
        fixed.update(batch)
        old_torch.update(batch)
    steps, changed, total = [], 0, 0
    for a, b in zip(fixed.modules(), old_torch.modules()):
        if isinstance(a, QuantConv2d) and a.w_quant is not None:
            s = a.w_quant._scale(a.weight).detach()
            steps.append(((b.weight - a.weight).abs() / s).max().item())
            codes = a.w_quant.integers(a.weight), b.w_quant.integers(b.weight)
            changed += (codes[0] != codes[1]).sum().item()
            total += codes[0].numel()
    return {"max_drift_in_steps": summary(steps), "codes_changed_fraction": changed / total,
            "steps_after_start": after}


def saq_activation_scales() -> dict:
    [batch] = rotated_digits_batches(1)
    x = torch.cat([b[0] for b in batch])
    y = torch.cat([b[1] for b in batch])
    grads, shares, moves = {}, None, None
    for flag in (True, False, "again"):  # "again": no act. scales once more (a control)
        saq = build("SAQ", saq_perturb_act_scales=flag is True, w_bits=4, a_bits=4,
                    batch_size=8)
        saq.predict(x)  # calibrate
        act = [q.scale for _, q in quantizers(saq) if not q.is_weight]
        if flag is True:  # the clean pass's gradients: the scales' share of ||g||^2 and their eps
            zeros = [torch.zeros_like(m.weight, requires_grad=True) for m in saq.quantized]
            for m, z in zip(saq.quantized, zeros):
                m.weight_offset = z
            saq.loss(x, y).backward()
            for m in saq.quantized:
                m.weight_offset = None
            g2 = [z.grad.pow(2).sum() for z in zeros] + [
                p.grad.pow(2).sum() for p in saq.perturbed if p.grad is not None]
            act2 = sum(s.grad.pow(2).sum() for s in act)
            norm = torch.stack(g2).sum().sqrt()
            shares = (act2 / norm ** 2).item()
            moves = summary([(saq.hparams["rho"] * s.grad.abs() / norm / s.abs()).item()
                             for s in act])
            saq.zero_grad(set_to_none=True)
        saq.step(x, y)
        grads[flag] = torch.cat([p.grad.reshape(-1) for p in saq.parameters()
                                 if p.grad is not None])
    def change(a, b) -> float:
        return ((grads[a] - grads[b]).norm() / grads[b].norm()).item()

    return {"act_scales_share_of_norm_sq": shares, "act_scale_relative_move": moves,
            "update_gradient_relative_change": change(True, False),
            "control_same_step_twice": change("again", False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--parts", nargs="+", choices=["qtdog", "saq"], default=["qtdog", "saq"])
    args = parser.parse_args()
    domainbed_gaqat.register()
    figures = {"torch": torch.__version__}
    if "qtdog" in args.parts:
        figures["qtdog"] = {**qtdog_init_and_grad_scale(),
                            "release_torch_lt_2": qtdog_release_drift()}
    if "saq" in args.parts:
        figures["saq"] = saq_activation_scales()
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
