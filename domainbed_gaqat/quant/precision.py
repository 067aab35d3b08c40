"""Training state that keeps its precision: float32 however the model around it is cast.

A model cast to a 16-bit float type (``model.to(torch.bfloat16)``, ``.half()``) would cast every
floating-point parameter and buffer: LSQ scales (whose gradient ``round(x) - x`` is below bf16's
resolution, paper sec. 2.1) and the gradient-disorder statistics of Algorithm 1 would lose the
precision they are compared and updated in. :class:`Float32State` modules are moved by such a
cast but keep their floating-point tensors, and those tensors' gradients, at least float32.
"""

from collections.abc import Callable

import torch
from torch import nn


def _keeping_float32(fn: Callable[[torch.Tensor], torch.Tensor]
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (a conversion ``nn.Module._apply`` passes on), except that a floating-point
    tensor it would narrow below 32 bits is moved to ``fn``'s device from its own values."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if t.is_floating_point() and out.is_floating_point() and out.dtype.itemsize < 4:
            return t.to(out.device, torch.promote_types(out.dtype, torch.float32))
        return out
    return convert


class Float32State(nn.Module):
    """Base of modules whose floating-point state stays at least float32: ``to`` / ``cuda`` /
    ``bfloat16`` / ``half`` move it to the new device but never narrow it below float32
    (a float64 cast applies). Their own computations promote to it (``quant.lsq._promote``).

    >>> from torch import nn
    >>> class Scale(Float32State):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.s = nn.Parameter(torch.tensor(0.1234567))
    >>> model = nn.Sequential(nn.Linear(2, 2), Scale()).to(torch.bfloat16)
    >>> model[0].weight.dtype, model[1].s.dtype, model[1].s.item() == torch.tensor(0.1234567).item()
    (torch.bfloat16, torch.float32, True)
    """

    def _apply(self, fn, recurse=True):
        return super()._apply(_keeping_float32(fn), recurse)
