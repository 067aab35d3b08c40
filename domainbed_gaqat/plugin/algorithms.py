"""The plugin's DomainBed algorithms. They share one featurizer and differ only in their step.

Each is declared with ``@algorithm`` (:mod:`domainbed_gaqat.plugin.registry`); the first line
of its docstring is its summary. :data:`ALGORITHMS` is the registry they fill.

>>> ALGORITHMS["GAQAT"].quantized, ALGORITHMS["GAQAT"].families
(True, ('quant', 'sagm', 'gaqat'))
"""

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from domainbed.algorithms import Algorithm
from torch import nn
from torch.utils.hooks import RemovableHandle

from domainbed_gaqat.optim.freezing import ScaleFreezer
from domainbed_gaqat.optim.param_groups import separate_scales
from domainbed_gaqat.optim.sagm import flat_grads, sagm_step
from domainbed_gaqat.optim.saq import saq_step
from domainbed_gaqat.optim.swad import SWAD
from domainbed_gaqat.plugin.featurizer import Featurizer, quant_policy
from domainbed_gaqat.plugin.hooks import require_loop
from domainbed_gaqat.plugin.hparams import validate
from domainbed_gaqat.plugin.initial_weights import initialize, load_earlier_stage
from domainbed_gaqat.plugin.registry import AlgorithmSpec, algorithm, specs
from domainbed_gaqat.quant.modules import (
    QuantConv2d,
    check_initialization,
    quantizers,
    set_quantization,
)


@dataclass(frozen=True)
class ScaleGradients:
    """The quantizer scales' gradients of one step, in the order of ``algorithm.scales``:
    ``applied`` is what the optimizer uses; with SAGM, ``task`` (clean pass) and ``smooth``
    (perturbed pass), and for GAQAT the freeze flags in effect (``frozen``); without SAGM
    ``task`` is ``applied`` and the others are None."""

    task: torch.Tensor
    smooth: torch.Tensor | None
    applied: torch.Tensor
    frozen: torch.Tensor | None


class FeaturizerAlgorithm(Algorithm):
    """Builds the shared featurizer, a linear classifier and Adam with two param groups:
    the latent weights at ``lr`` / ``weight_decay`` and the quantizer scales at ``scale_lr``
    (1e-5, no weight decay; paper sec. 4.1). Subclasses implement :meth:`step`."""

    SPEC: AlgorithmSpec  # set by @algorithm

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        validate(self.SPEC, hparams)
        super().__init__(input_shape, num_classes, num_domains, hparams)
        policy = quant_policy(hparams) if self.SPEC.quantized else None
        self.featurizer = Featurizer(input_shape, hparams, policy)
        self.classifier = nn.Linear(self.featurizer.n_outputs, num_classes)
        initialize(self.featurizer, hparams)
        load_earlier_stage(self, hparams, ("featurizer", "classifier"))
        self._quantizers = list(quantizers(self))
        self.scales = [q.scale for _, q in self._quantizers]
        scale_ids = {id(s) for s in self.scales}
        self.weights = [p for p in self.parameters() if p.requires_grad and id(p) not in scale_ids]
        self.optimizer = torch.optim.Adam(self.weights + self.scales, lr=hparams["lr"],
                                          weight_decay=hparams["weight_decay"])
        if self.scales:
            separate_scales(self.optimizer, hparams["scale_lr"])
        self._scale_hooks: OrderedDict[int, Callable[[ScaleGradients], None]] = OrderedDict()

    def register_scale_gradient_hook(self, hook: Callable[[ScaleGradients], None]
                                     ) -> RemovableHandle:
        """Call ``hook(ScaleGradients)`` in every step, before the optimizer steps."""
        handle = RemovableHandle(self._scale_hooks)
        self._scale_hooks[handle.id] = hook
        return handle

    def _scale_gradients(self, grads: ScaleGradients) -> None:
        for hook in self._scale_hooks.values():
            hook(grads)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.predict(x), y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step; returns 0-d tensors and never synchronises with the host."""
        raise NotImplementedError

    def update_tensors(self, minibatches, unlabeled=None) -> dict[str, torch.Tensor]:
        """DomainBed's ``update`` without its host sync: the step's statistics as 0-d tensors
        on the device. A training loop that averages them there reads them when it syncs
        anyway (at checkpoints). Range initialisation errors of earlier steps are raised here
        once the device has finished those steps (no waiting)."""
        check_initialization(self._quantizers)
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        return self.step(x, y)

    def update(self, minibatches, unlabeled=None) -> dict[str, float]:
        """DomainBed's ``update``: :meth:`update_tensors` and one host sync for the floats."""
        stats = self.update_tensors(minibatches, unlabeled)
        values = torch.stack(list(stats.values())).tolist()  # the step's only host sync
        check_initialization(self._quantizers)  # this step's, readable after that sync
        return dict(zip(stats, values))


@algorithm(benchmark=True)
class ERM_FP(FeaturizerAlgorithm):
    """Adam on the task loss, full precision (paper's "ERM Full" row; stage 1 of QAT)."""

    def step(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        loss.backward()
        self._before_optimizer_step()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def _before_optimizer_step(self) -> None:
        """The scale-gradient hooks of a single-pass step."""
        if self.scales and self._scale_hooks:
            applied = flat_grads(self.scales)
            self._scale_gradients(ScaleGradients(applied, None, applied, None))


@algorithm(families=("sagm",))
class SAGM(FeaturizerAlgorithm):
    """SAGM (Wang et al. 2023; paper sec. 2.2), full precision."""

    def scale_grads(self, g_task: torch.Tensor, g_smooth: torch.Tensor) -> torch.Tensor:
        """Gradient applied to the scales: both halves, like the weights."""
        return 0.5 * (g_task + g_smooth)

    def frozen(self) -> torch.Tensor | None:
        """The scales' freeze flags in effect for this step (None: no freezing)."""
        return None

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return {}

    def step(self, x, y):
        loss, g_task, g_smooth = sagm_step(lambda: self.loss(x, y), self, self.weights,
                                           self.scales, self.hparams["rho"],
                                           self.hparams["alpha"])
        if self.scales:
            frozen = self.frozen()
            frozen = None if frozen is None or not self._scale_hooks else frozen.clone()
            applied = self.scale_grads(g_task, g_smooth)
            for scale, grad in zip(self.scales, applied.split([s.numel() for s in self.scales])):
                scale.grad = grad.view_as(scale)
            if self._scale_hooks:
                self._scale_gradients(ScaleGradients(g_task, g_smooth, applied, frozen))
        self.optimizer.step()
        return {"loss": loss, **self.diagnostics()}


@algorithm(families=("quant",), baseline="ERM_FP", benchmark=True)
class LSQ(ERM_FP):
    """Adam on the LSQ-quantized featurizer, scales at their own lr (paper sec. 2.1)."""


@algorithm(families=("quant", "sagm"), baseline="LSQ", benchmark=True)
class SAGM_LSQ(SAGM):
    """SAGM on the quantized featurizer; scales take ``g_task`` and ``g_smooth`` (Eq. 1)."""


@algorithm(families=("quant", "sagm", "gaqat"), baseline="SAGM_LSQ", benchmark=True)
class GAQAT(SAGM_LSQ):
    """SAGM_LSQ + selective freezing of scales (paper sec. 3.3, Algorithm 1).

    A scale whose task-gradient disorder over the last K steps is below r is updated by
    ``g_smooth`` only for the next K steps.
    """

    FREEZE_RULE = "gaqat"

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.freezer = ScaleFreezer(len(self.scales), hparams["gaqat_K"], hparams["gaqat_r"],
                                    self.FREEZE_RULE, device=self.scales[0].device)

    def scale_grads(self, g_task, g_smooth):
        return self.freezer.combine(g_task, g_smooth)

    def frozen(self):
        return self.freezer.frozen

    def diagnostics(self):
        return {"frozen_frac": self.freezer.frozen.float().mean(),
                "disorder_mean": self.freezer.tracker.disorder.mean()}


@algorithm(families=("quant", "sagm", "gaqat"), baseline="GAQAT")
class GAQAT_ReverseRatio(GAQAT):
    """GAQAT freezing the scales with disorder >= r (Table 4, "Reverse Ratio")."""

    FREEZE_RULE = "reverse"


@algorithm(families=("quant", "sagm", "gaqat"), baseline="GAQAT")
class GAQAT_NoUnfreeze(GAQAT):
    """GAQAT never unfreezing a scale once frozen (Table 4, "w/o Unfreeze")."""

    FREEZE_RULE = "no_unfreeze"


@algorithm(families=("quant", "saq"), baseline="LSQ")
class SAQ(LSQ):
    """SAM on the quantized weights, SAQ's case 3 (Liu et al.; rho 0.1 by default).

    As its release (``utils/qsam.py`` of zhuang-group/SAQ, default ``include_aclip=True``,
    ``include_wclip=False``): the activation quantizers' learnable parameters are perturbed too
    and counted in the norm; LIQ's are clip values ``a``, LSQ's are scales ``s = a / u``, so
    here each activation scale moves by ``rho * dL/ds / ||g||`` with ``dL/ds`` the gradient the
    optimizer sees (LSQ's gradient scale included); ``saq_perturb_act_scales: false`` leaves
    them out. The weight scales are not perturbed (``include_wclip=False``). Beside the
    release: LSQ instead of its learnable-clip quantizer (LIQ); the shared featurizer's policy
    (stem input only, classifier full precision) instead of 8-bit first and last layers; Adam
    at DomainBed's lr instead of SGD with Nesterov momentum and a cosine schedule; BatchNorm
    statistics frozen (the shared featurizer's; the release updates them in both passes);
    its "efficient training strategy" is not in its code, nor here. Measured in
    docs/seed-systems.md.
    """

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.quantized = [m for m in self.modules()
                          if isinstance(m, QuantConv2d) and m.w_quant is not None]
        quantized_ids = {id(m.weight) for m in self.quantized}
        act_scales = ([q.scale for _, q in quantizers(self) if not q.is_weight]
                      if hparams["saq_perturb_act_scales"] else [])
        act_ids = {id(s) for s in act_scales}
        self.perturbed = [p for p in self.weights if id(p) not in quantized_ids] + act_scales
        self.unperturbed = [s for s in self.scales if id(s) not in act_ids]

    def step(self, x, y):
        loss = saq_step(lambda: self.loss(x, y), self, self.quantized, self.perturbed,
                        self.unperturbed, self.hparams["rho"])
        self._before_optimizer_step()
        self.optimizer.step()
        return {"loss": loss}


class QuantStart:
    """QT-DoG's schedule (Javed et al. 2024): the quantizers are the identity until
    ``quant_start`` updates are done, then on. The count is the buffer ``steps_done`` (saved
    with the model, so a resumed run switches at the same update), mirrored on the host (no
    device sync per update). Mixed in before an algorithm; its update calls
    :meth:`_begin_update` and :meth:`_end_update` around each step."""

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._steps = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._steps = int(self.steps_done)

    def _begin_update(self) -> None:
        if self._steps == self.hparams["quant_start"]:
            set_quantization(self, True)

    def _end_update(self) -> None:
        self._steps += 1
        self.steps_done.fill_(self._steps)


class QTDoGStep(QuantStart):
    """:class:`QuantStart` around the plugin's ``step``, and the release's fixed parameters
    (``qtdog_release``, see :class:`QTDoG`)."""

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        if hparams.get("qtdog_release", False) and "sagm" in self.SPEC.families:
            raise ValueError(f"{self.SPEC.name}: qtdog_release reproduces QT-DoG's release, "
                             "whose step is ERM's: SAGM's step is not one")
        super().__init__(input_shape, num_classes, num_domains, hparams)
        convs = [m.weight for m in self.modules() if isinstance(m, QuantConv2d)]
        self.fixed_after_start = [*convs, *self.scales] if hparams["qtdog_release"] else []

    def step(self, x, y):
        self._begin_update()
        stats = super().step(x, y)
        self._end_update()
        return stats

    def _before_optimizer_step(self) -> None:
        if self._steps >= self.hparams["quant_start"]:
            for p in self.fixed_after_start:
                p.grad = None  # Adam skips a parameter without a gradient
        super()._before_optimizer_step()


@algorithm(families=("qtdog",), baseline="LSQ", defaults={"weight_decay": 0.0})
class QTDoG(QTDoGStep, ERM_FP):
    """QT-DoG (Javed et al. 2024): LSQ on the conv weights only, 7 bits, per channel, from
    step ``quant_start``.

    Before ``quant_start`` the quantizers are the identity; at it, each scale initialises from
    the current weights by LSQ's ``2 * mean|w_c| / sqrt(Q_P)`` and its gradient is scaled by
    ``1 / sqrt(Q_P * N)``, ``N`` the whole weight tensor's size, as in the release
    (``w_scale_init: mse`` and ``w_grad_scale_n: scale``, one channel's ``N`` as the LSQ paper,
    are this project's alternatives). Every parameter is in the optimizer from step 0.
    ``qtdog_release`` reproduces the public release's two bugs: the stem's weights are
    quantized too (its exclusion compared ``conv1`` with full names), and after
    ``quant_start`` the conv weights and the scales stay fixed (the quantized modules were
    swapped in without rebuilding the optimizer): only BatchNorm's affine parameters and the
    classifier train. Fixed exactly as under torch >= 2.0; under torch < 2.0 (the release
    pins 1.10.1) ``zero_grad()`` kept zero gradients, so Adam's momentum moved the old
    parameters, whose storage the swapped-in weights share, for a while after the swap (the
    scales, never in the optimizer, stay fixed under any torch). Measured in
    docs/seed-systems.md.
    """


class WithSWAD:
    """SWAD (Cha et al. 2021) on top of an algorithm's step: dense weight averaging over the
    loss valley of the training-domain validation loss (:mod:`domainbed_gaqat.optim.swad`, the
    official rule and constants). Mixed in before a :class:`FeaturizerAlgorithm`.

    Every step's parameters (all of them, quantizer scales included, as the release's
    ``AveragedModel``) join the segment average; ``gaqat train``'s hooks hand it the validation
    loss at each evaluation, and once the valley is dead it asks the loop to end the run (its
    ``on_checkpoint`` returns True; the release stops there; later segments never count). At
    the end the averaged parameters are loaded into the algorithm, so the run's ``model.pkl``
    is the SWAD model and its accuracies join the last record as ``swad_env{i}_*_acc`` (the
    last iterate's stay in every record). With ``quant_start`` (QT-DoG), SWAD restarts when
    quantization starts, as QT-DoG's release does. Buffers are the model's: the shared
    featurizer's BatchNorm is frozen, so their statistics are those of every iterate; the
    official ``update_bn`` runs only without ``freeze_bn`` (it would reset the frozen
    statistics to 0 / 1 and leave them there). Needs ``gaqat train``: DomainBed's train.py
    refuses it.
    """

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        require_loop(self.SPEC.name)
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.swad = SWAD(hparams["swad_n_converge"], hparams["swad_n_tolerance"],
                         hparams["swad_tolerance_ratio"])

    def step(self, x, y):
        if self.swad.steps == self.hparams.get("quant_start", 0) > 0:
            self.swad.restart()
        stats = super().step(x, y)
        self.swad.observe(list(self.parameters()))
        return stats

    def on_checkpoint(self, step: int, val_loss: float) -> bool:
        """The segment since the previous evaluation goes to the loss valley; True (stop the
        run) once the valley is dead."""
        valley = self.swad.valley
        converged = valley.converged
        dead = self.swad.evaluated(val_loss)
        if valley.converged and not converged:
            print(f"SWAD: converged at step {valley.converge_step}, threshold "
                  f"{valley.threshold:.6f}")
        if dead:
            print(f"SWAD: the loss valley is dead at step {step}: the run ends here")
        return dead

    def on_train_end(self, minibatches) -> None:
        """Load the final average into the parameters (BatchNorm frozen: no statistics to
        update, so ``minibatches`` are not used)."""
        final = self.swad.final()
        if final is None:
            print("SWAD: nothing averaged: the model is the last iterate")
            return
        with torch.no_grad():
            torch._foreach_copy_(list(self.parameters()),
                                 [t.to(p.device) for t, p in zip(final.tensors,
                                                                 self.parameters())])
        what = ("the average of" if self.swad.valley.converged
                else "no loss valley found: the last segment,")
        print(f"SWAD: the model is {what} {final.count} terms, steps "
              f"{final.start_step}-{final.end_step}")
        self.swad.restart()

    def extra_models(self) -> dict[str, nn.Module]:
        return {"swad": self}


@algorithm(families=("swad",), baseline="ERM_FP")
class SWAD_FP(WithSWAD, ERM_FP):
    """SWAD (Cha et al. 2021): ERM on the full-precision featurizer with dense averaging."""


# --- the quantized variants of a full-precision algorithm (<Name>_LSQ, <Name>_QTDoG) ----------

VARIANT_FAMILIES = {"LSQ": ("quant",), "QTDoG": ("qtdog",)}
VARIANT_DEFAULTS = {"LSQ": {}, "QTDoG": {"weight_decay": 0.0}}  # QT-DoG's weight decay 0
VARIANT_BASELINES = {"LSQ": "LSQ", "QTDoG": "QTDoG"}  # ERM's variant: the benchmark's baseline
VARIANT_SUMMARIES = {
    "LSQ": "on the LSQ-quantized featurizer (the paper's W/A policy, scales at their own lr)",
    "QTDoG": "with QT-DoG's quantization (weights only, per channel, from quant_start)"}


def variant_of(fp: type, variant: str, name: str) -> type:
    """``name``, the ``LSQ`` or ``QTDoG`` variant of the plugin's full-precision algorithm
    ``fp``: the same step on the featurizer quantized by that policy (with QT-DoG's schedule),
    registered with ``@algorithm`` (families ``fp``'s plus the variant's). How ``SWAD_LSQ`` and
    ``SWAD_QTDoG`` are made, and every ``<Name>_LSQ`` / ``_QTDoG`` of a plugin algorithm
    (:mod:`domainbed_gaqat.plugin.generic`)."""
    if variant not in VARIANT_FAMILIES:
        raise ValueError(f"variant {variant!r}: expected one of {list(VARIANT_FAMILIES)}")
    spec = fp.SPEC
    summary = f"{spec.name.removesuffix('_FP')} {VARIANT_SUMMARIES[variant]}."
    cls = type(name, ((QTDoGStep, fp) if variant == "QTDoG" else (fp,)),
               {"__doc__": summary, "__module__": __name__, "__qualname__": name})
    return algorithm(families=spec.families + VARIANT_FAMILIES[variant],
                     baseline=VARIANT_BASELINES[variant],
                     defaults={**spec.defaults, **VARIANT_DEFAULTS[variant]})(cls)


SWAD_LSQ = variant_of(SWAD_FP, "LSQ", "SWAD_LSQ")
SWAD_QTDoG = variant_of(SWAD_FP, "QTDoG", "SWAD_QTDoG")  # QT-DoG as released: SWAD restarts at
# quant_start (WithSWAD)


ALGORITHMS: dict[str, AlgorithmSpec] = specs()
