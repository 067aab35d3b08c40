"""SWAD (Cha et al. 2021): dense stochastic weight averaging over the loss valley, as its
official code runs it (``domainbed/swad.py``, ``lib/swa_utils.py``, ``trainer.py`` of khanrc/swad;
QT-DoG's release carries the same files).

Every step the weights join a *segment*: the running mean of the iterates since the previous
evaluation. At each evaluation the segment, labelled with the training-domain validation loss of
the current model, goes to :class:`LossValley`, which picks the segments of the final average:

- *converged*: once the oldest of the last ``n_converge`` losses is their smallest (the first
  one on ties). The threshold is their mean times ``1 + tolerance_ratio``; of the
  ``n_tolerance - n_converge + 1`` oldest of the last ``n_tolerance`` segments (the converging
  one the last of them once the window is full) the average takes those from two after the
  last one above the threshold (so the oldest never counts);
- *in the valley*: each later evaluation adds the oldest of the last ``n_tolerance`` segments
  (once it is not older than the converging one) while the least of their losses stays below
  the threshold;
- *dead*: the first time that least loss is above the threshold; the release then stops
  training. At the end, the segments still in the window are added, oldest first, while the
  least loss of those left is below the threshold. Without convergence the final model is
  the last segment.

The official code's arithmetic is kept as it is, quirks included: the average starts from a copy
of the converging segment counted zero times, which the first segment added overwrites; the
converging segment is added again when it becomes the oldest of the window (twice in all); a
run that converges before its window is full adds the window's oldest segment at every
evaluation until the window is full. Averages are ``a + (x - a) / (n + 1)`` (torch's
``AveragedModel``); the segments in the window and the final average live on the CPU, as there.
Everything is plain data (:meth:`SWAD.get_extra_state`), so a weights-only checkpoint restores
it exactly.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class WeightAverage:
    """A running mean of tensor lists (the release's ``AveragedModel.update_parameters``): the
    first :meth:`add` copies (whatever ``tensors`` held), each later one moves the mean by
    ``(x - mean) / (count + 1)``; ``start_step`` is set by the first add, ``end_step`` by every
    one (-1 until then).

    >>> a = WeightAverage()
    >>> for x in (1.0, 2.0, 6.0):
    ...     a.add([torch.tensor(x)], start_step=int(x), end_step=int(x))
    >>> a.tensors[0].item(), a.count, a.start_step, a.end_step
    (3.0, 3, 1, 6)
    """

    tensors: list[torch.Tensor] = field(default_factory=list)
    count: int = 0
    start_step: int = -1
    end_step: int = -1
    loss: float | None = None  # a segment's: the validation loss at its evaluation

    @torch.no_grad()
    def add(self, tensors: Sequence[torch.Tensor], start_step: int | None = None,
            end_step: int | None = None) -> None:
        if not self.tensors:
            self.tensors = [t.detach().clone() for t in tensors]
        elif self.count == 0:
            torch._foreach_copy_(self.tensors, [t.detach().to(a.device)
                                                for t, a in zip(tensors, self.tensors)])
        else:
            moved = [t.detach().to(a.device) for t, a in zip(tensors, self.tensors)]
            delta = torch._foreach_sub(moved, self.tensors)
            torch._foreach_div_(delta, self.count + 1)
            torch._foreach_add_(self.tensors, delta)
        self.count += 1
        if start_step is not None and self.count == 1:
            self.start_step = start_step
        if end_step is not None:
            self.end_step = end_step

    def include(self, segment: "WeightAverage") -> None:
        """Add a segment's mean as one term (``update_parameters(segment, start_step=...,
        end_step=...)``)."""
        self.add(segment.tensors, segment.start_step, segment.end_step)

    def copy(self, device: torch.device | str | None = None, count: int | None = None
             ) -> "WeightAverage":
        return WeightAverage([t.detach().to(device, copy=True) for t in self.tensors],
                             self.count if count is None else count, self.start_step,
                             self.end_step, self.loss)

    def state(self) -> dict:
        return {"tensors": list(self.tensors), "count": self.count,
                "start_step": self.start_step, "end_step": self.end_step, "loss": self.loss}

    @classmethod
    def from_state(cls, state: dict) -> "WeightAverage":
        return cls([t.clone() for t in state["tensors"]], state["count"], state["start_step"],
                   state["end_step"], state["loss"])


class LossValley:
    """The official ``LossValley`` rule (see the module docstring): :meth:`update` at every
    evaluation with the segment since the previous one (its ``loss`` set), :meth:`final` at the
    end. ``converge`` / ``smooth`` are the release's ``converge_Q`` (the last ``n_converge``
    segments) and ``smooth_Q`` (the last ``n_tolerance``)."""

    def __init__(self, n_converge: int = 3, n_tolerance: int = 6,
                 tolerance_ratio: float = 0.3) -> None:
        for name, value in (("n_converge", n_converge), ("n_tolerance", n_tolerance)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} {value!r}: expected an integer >= 1")
        if not tolerance_ratio >= 0:
            raise ValueError(f"tolerance_ratio {tolerance_ratio!r}: expected a number >= 0")
        self.n_converge, self.n_tolerance = n_converge, n_tolerance
        self.tolerance_ratio = tolerance_ratio
        self.converge: list[WeightAverage] = []
        self.smooth: list[WeightAverage] = []
        self.average: WeightAverage | None = None  # the release's final_model
        self.converge_step: int | None = None
        self.threshold: float | None = None
        self.dead = False

    @property
    def converged(self) -> bool:
        return self.converge_step is not None

    def _least_loss(self, segments: Iterable[WeightAverage]) -> float:
        return min(s.loss for s in segments)

    def update(self, segment: WeightAverage) -> None:
        """The release's ``update_and_evaluate``; ``segment`` is kept (a CPU copy is the
        caller's to make)."""
        if self.dead:
            return
        self.converge = [*self.converge, segment][-self.n_converge:]
        self.smooth = [*self.smooth, segment][-self.n_tolerance:]
        if not self.converged:
            if len(self.converge) == self.n_converge:
                self._try_converge()
            return
        if self.smooth[0].end_step < self.converge_step:
            return
        if self._least_loss(self.smooth) > self.threshold:
            self.dead = True
            return
        self.average.include(self.smooth[0])

    def _try_converge(self) -> None:
        losses = [s.loss for s in self.converge]
        if min(range(len(losses)), key=losses.__getitem__) != 0:
            return
        self.converge_step = self.converge[0].end_step
        self.average = self.converge[0].copy(count=0)
        self.average.start_step = self.average.end_step = -1
        total = 0.0
        for loss in losses:
            total += loss
        self.threshold = total / len(losses) * (1.0 + self.tolerance_ratio)
        if self.n_tolerance < self.n_converge:
            for segment in self.converge[1:1 + self.n_converge - self.n_tolerance]:
                self.average.include(segment)
        elif self.n_tolerance > self.n_converge:
            window = self.smooth[:self.n_tolerance - self.n_converge + 1]
            above = [i for i, s in enumerate(window) if s.loss > self.threshold]
            start = above[-1] + 1 if above else 0
            for segment in window[start + 1:]:
                self.average.include(segment)

    def final(self) -> WeightAverage | None:
        """The release's ``get_final_model``: without convergence the last segment (None
        without any); else the segments still in the window are added while the least loss of
        those left is below the threshold (not after a dead valley). Changes the window."""
        if not self.converged:
            return self.converge[-1] if self.converge else None
        if not self.dead:
            left = self.smooth[1:]
            while left and self._least_loss(left) <= self.threshold:
                segment, left = left[0], left[1:]
                self.average.add(segment.tensors, segment.end_step, segment.end_step)
            self.smooth = left
        return self.average

    def state(self) -> dict:
        segments, index = [], {}
        for s in [*self.smooth, *self.converge]:
            if id(s) not in index:
                index[id(s)] = len(segments)
                segments.append(s.state())
        return {"segments": segments, "converge": [index[id(s)] for s in self.converge],
                "smooth": [index[id(s)] for s in self.smooth],
                "average": None if self.average is None else self.average.state(),
                "converge_step": self.converge_step, "threshold": self.threshold,
                "dead": self.dead}

    def load_state(self, state: dict) -> None:
        segments = [WeightAverage.from_state(s) for s in state["segments"]]
        self.converge = [segments[i] for i in state["converge"]]
        self.smooth = [segments[i] for i in state["smooth"]]
        self.average = (None if state["average"] is None
                        else WeightAverage.from_state(state["average"]))
        self.converge_step, self.threshold = state["converge_step"], state["threshold"]
        self.dead = state["dead"]


class SWAD(nn.Module):
    """SWAD driven by a training loop (the release's ``trainer.py``), its state in the module's
    ``state_dict`` (``_extra_state``: tensors and plain values).

    :meth:`observe` after every step with the model's parameters (in a fixed order);
    :meth:`evaluated` at every evaluation with the training-domain validation loss (it returns
    True once the valley is dead: the release stops training); :meth:`final` at the end.
    :meth:`restart` forgets everything but the step count (QT-DoG's release restarts SWAD when
    quantization starts).
    """

    VERSION = 1

    def __init__(self, n_converge: int = 3, n_tolerance: int = 6,
                 tolerance_ratio: float = 0.3) -> None:
        super().__init__()
        self.settings = (n_converge, n_tolerance, tolerance_ratio)
        self.steps = 0  # steps observed: the training loop's step of the next observe
        self.restart()

    def restart(self) -> None:
        self.segment = WeightAverage()
        self.valley = LossValley(*self.settings)

    def observe(self, params: Sequence[torch.Tensor]) -> None:
        """The weights after step ``self.steps`` join the current segment (kept on their
        device: a segment restored from a checkpoint moves there)."""
        segment = self.segment.tensors
        if segment and segment[0].device != params[0].device:
            self.segment.tensors = [t.to(p.device) for t, p in zip(segment, params)]
        self.segment.add(params, self.steps, self.steps)
        self.steps += 1

    def evaluated(self, val_loss: float) -> bool:
        """The current segment, labelled with ``val_loss``, goes to the loss valley (a CPU
        copy); a new segment starts. Returns whether the valley is dead."""
        if self.segment.count:
            segment = self.segment.copy("cpu")
            segment.loss = float(val_loss)
            self.valley.update(segment)
        self.segment = WeightAverage()
        return self.valley.dead

    def final(self) -> WeightAverage | None:
        return self.valley.final()

    def get_extra_state(self) -> dict:
        return {"version": self.VERSION, "settings": list(self.settings), "steps": self.steps,
                "segment": self.segment.state(), "valley": self.valley.state()}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != self.VERSION:
            raise ValueError(f"SWAD state: expected version {self.VERSION}, got "
                             f"{state.get('version') if isinstance(state, dict) else state!r}")
        if tuple(state["settings"]) != self.settings:
            raise ValueError(f"SWAD state of settings {state['settings']} loaded into SWAD "
                             f"with {list(self.settings)}")
        self.steps = state["steps"]
        self.segment = WeightAverage.from_state(state["segment"])
        self.valley = LossValley(*self.settings)
        self.valley.load_state(state["valley"])
