"""What ``gaqat train`` offers an algorithm beyond DomainBed's ``update()``.

DomainBed's ``train.py`` only calls ``update(minibatches)``, ``predict`` (through
``misc.accuracy``) and ``state_dict``. An algorithm that needs more of the training loop (SWAD:
the training-domain validation loss at every checkpoint, a pass over training batches at the
end, an averaged model evaluated beside the last iterate) implements the optional methods of
:class:`LoopHooks`; ``gaqat train`` calls those it finds, in this order:

1. ``on_checkpoint(step, val_loss)`` after each evaluated checkpoint, with ``val_loss`` the mean
   over the training domains of the mean cross-entropy on each domain's out split; a true
   return value ends the run after this checkpoint, as if it were the last step (SWAD's dead
   loss valley: its release stops training there);
2. after the last step: ``on_train_end(minibatches)``, ``minibatches`` an iterator over more
   training batches (DomainBed minibatch lists, on the run's device), then
   ``extra_models()``: each model is evaluated on every split and its accuracies join the last
   record as ``<prefix>_env{i}_{in,out}_acc``;
3. the run's ``model.pkl`` is the algorithm's ``state_dict`` after that.

An algorithm that needs these hooks calls :func:`require_loop` when it is built; it refuses
under DomainBed's own ``train.py``, which would silently skip them. ``gaqat train`` and the
code that rebuilds an algorithm from a ``model.pkl`` build it inside :func:`hosted`.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, runtime_checkable

from torch import nn

_HOSTED: ContextVar[bool] = ContextVar("domainbed_gaqat_hosted", default=False)


@runtime_checkable
class LoopHooks(Protocol):
    """The optional training-loop hooks (see the module docstring); an algorithm may define
    any of them."""

    def on_checkpoint(self, step: int, val_loss: float) -> bool | None: ...

    def on_train_end(self, minibatches: Iterator[list]) -> None: ...

    def extra_models(self) -> dict[str, nn.Module]: ...


@contextmanager
def hosted() -> Iterator[None]:
    """Build algorithms inside: the loop around them calls the hooks (or only evaluates)."""
    token = _HOSTED.set(True)
    try:
        yield
    finally:
        _HOSTED.reset(token)


def require_loop(algorithm: str) -> None:
    """Refuse to build ``algorithm`` outside :func:`hosted` (DomainBed's ``train.py``).

    >>> require_loop("SWAD")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: SWAD needs the training-loop hooks of `gaqat train` ...
    >>> with hosted():
    ...     require_loop("SWAD")
    """
    if not _HOSTED.get():
        raise ValueError(f"{algorithm} needs the training-loop hooks of `gaqat train` "
                         "(python -m domainbed_gaqat.train, same arguments as DomainBed's "
                         "train.py): DomainBed's train.py would skip them")
