"""The quantizer scales' own param group (paper sec. 4.1: scales train at a fixed lr of 1e-5,
without weight decay, apart from the latent weights), in any optimizer.

An optimizer built over a model's parameters, by whoever built it, gets its scales moved out of
their groups into one group of their own: :func:`separate_scales`. Scales are recognised by
their type (:class:`~domainbed_gaqat.quant.modules.Scale`), so an optimizer over a deep copy of
the model is split too.

>>> from torch import nn
>>> from domainbed_gaqat.quant.config import QuantConfig
>>> from domainbed_gaqat.quant.modules import LSQQuantizer
>>> model = nn.ModuleDict({"fc": nn.Linear(2, 2), "q": LSQQuantizer(QuantConfig(4, False), False)})
>>> adam = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
>>> separate_scales(adam, 1e-5), separate_scales(adam, 1e-5)  # moved once
(True, False)
>>> [(len(g["params"]), g["lr"], g["weight_decay"]) for g in adam.param_groups]
[(2, 0.001, 0.0001), (1, 1e-05, 0.0)]
"""

import torch

from domainbed_gaqat.quant.modules import Scale


def separate_scales(optimizer: torch.optim.Optimizer, lr: float) -> bool:
    """Move every :class:`Scale` of ``optimizer``'s groups into one group of their own at
    ``lr`` with weight decay 0 (its other hyperparameters the optimizer's defaults), appended
    last, the scales in the order they were found; groups left empty are dropped. True when the
    groups changed; an optimizer already so is left as it is. Its state is kept (it is keyed by
    parameter)."""
    groups = optimizer.param_groups
    scales = [p for g in groups for p in g["params"] if isinstance(p, Scale)]
    last = groups[-1] if groups else {"params": []}
    if not scales or (len(last["params"]) == len(scales) and last["lr"] == lr
                      and all(isinstance(p, Scale) for p in last["params"])
                      and last.get("weight_decay", 0.0) == 0.0):
        return False
    for group in groups:
        group["params"] = [p for p in group["params"] if not isinstance(p, Scale)]
    groups[:] = [g for g in groups if g["params"]]
    own = {"params": scales, "lr": lr}
    if "weight_decay" in optimizer.defaults:
        own["weight_decay"] = 0.0
    optimizer.add_param_group(own)
    return True
