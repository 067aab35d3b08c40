"""The plugin's DomainBed algorithms. They share one featurizer and differ only in their step.

=====================  ===========  ====================================================
name                   quantized    update step
=====================  ===========  ====================================================
ERM_FP                 no           Adam on the task loss (paper's "ERM Full", QAT stage 1)
SAGM                   no           SAGM (sec. 2.2)
LSQ                    W/A bits     Adam on the task loss, scales at their own lr (sec. 2.1)
SAGM_LSQ               W/A bits     SAGM; scales take ``g_task`` and ``g_smooth`` (Eq. 1)
GAQAT                  W/A bits     SAGM_LSQ + selective freezing (Algorithm 1)
GAQAT_ReverseRatio     W/A bits     freezes disorder >= r (Table 4)
GAQAT_NoUnfreeze       W/A bits     never unfreezes (Table 4)
=====================  ===========  ====================================================
"""

import torch
import torch.nn.functional as F
from domainbed.algorithms import Algorithm
from torch import nn

from domainbed_gaqat import hparams as hparams_lib
from domainbed_gaqat.freezing import ScaleFreezer
from domainbed_gaqat.networks import Featurizer, initialize, quantizers
from domainbed_gaqat.sagm import sagm_step

ALGORITHMS = ["ERM_FP", "SAGM", "LSQ", "SAGM_LSQ", "GAQAT", "GAQAT_ReverseRatio",
              "GAQAT_NoUnfreeze"]


class FeaturizerAlgorithm(Algorithm):
    """Builds the shared featurizer, a linear classifier and Adam with two param groups:
    the latent weights at ``lr`` / ``weight_decay`` and the quantizer scales at ``scale_lr``
    (1e-5, no weight decay; SPEC section 1). Subclasses implement :meth:`step`."""

    QUANTIZED = False

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        bits = (hparams["w_bits"], hparams["a_bits"]) if self.QUANTIZED else None
        self.featurizer = Featurizer(input_shape, hparams, bits)
        self.classifier = nn.Linear(self.featurizer.n_outputs, num_classes)
        initialize(self.featurizer, self.classifier, hparams)
        self.scales = [q.scale for _, q in quantizers(self)]
        scale_ids = {id(s) for s in self.scales}
        self.weights = [p for p in self.parameters() if p.requires_grad and id(p) not in scale_ids]
        groups = [{"params": self.weights, "lr": hparams["lr"],
                   "weight_decay": hparams["weight_decay"]}]
        if self.scales:
            groups.append({"params": self.scales, "lr": hparams["scale_lr"], "weight_decay": 0.0})
        self.optimizer = torch.optim.Adam(groups)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.predict(x), y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step; returns 0-d tensors and never synchronises with the host."""
        raise NotImplementedError

    def update(self, minibatches, unlabeled=None) -> dict[str, float]:
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        stats = self.step(x, y)
        values = torch.stack(list(stats.values())).tolist()  # the step's only host sync
        return dict(zip(stats, values))


class ERM_FP(FeaturizerAlgorithm):
    """Full-precision ERM on the shared featurizer."""

    def step(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}


class LSQ(ERM_FP):
    """Quantization-aware training with LSQ (Esser et al. 2019), W/A bits from hparams."""

    QUANTIZED = True


class SAGM(FeaturizerAlgorithm):
    """SAGM (Wang et al. 2023) on the full-precision shared featurizer."""

    def scale_grads(self, g_task: torch.Tensor, g_smooth: torch.Tensor) -> torch.Tensor:
        """Gradient applied to the scales: both halves, like the weights."""
        return 0.5 * (g_task + g_smooth)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return {}

    def step(self, x, y):
        loss, g_task, g_smooth = sagm_step(lambda: self.loss(x, y), self, self.weights,
                                           self.scales, self.hparams["rho"],
                                           self.hparams["alpha"])
        if self.scales:
            for scale, grad in zip(self.scales, self.scale_grads(g_task, g_smooth).unbind()):
                scale.grad = grad
        self.optimizer.step()
        return {"loss": loss, **self.diagnostics()}


class SAGM_LSQ(SAGM):
    """SAGM on the LSQ-quantized featurizer (paper Eq. 1, the "SAGM+LSQ" rows)."""

    QUANTIZED = True


class GAQAT(SAGM_LSQ):
    """GAQAT (paper sec. 3.3, Algorithm 1): a scale whose task-gradient disorder over the last
    K steps is below r is updated by ``g_smooth`` only for the next K steps."""

    FREEZE_RULE = "gaqat"

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.freezer = ScaleFreezer(len(self.scales), hparams["gaqat_K"], hparams["gaqat_r"],
                                    self.FREEZE_RULE)

    def scale_grads(self, g_task, g_smooth):
        return self.freezer.combine(g_task, g_smooth)

    def diagnostics(self):
        return {"frozen_frac": self.freezer.frozen.float().mean(),
                "disorder_mean": self.freezer.tracker.disorder.mean()}


class GAQAT_ReverseRatio(GAQAT):
    """Table 4 ablation "Reverse Ratio": freeze the scales with disorder >= r."""

    FREEZE_RULE = "reverse"


class GAQAT_NoUnfreeze(GAQAT):
    """Table 4 ablation "w/o Unfreeze": once frozen, a scale stays frozen."""

    FREEZE_RULE = "no_unfreeze"


assert set(ALGORITHMS) == set(hparams_lib.FAMILIES), "hparams.FAMILIES out of date"
