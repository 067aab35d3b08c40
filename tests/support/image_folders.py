"""Small image folders in DomainBed's layouts (``PACS/<domain>/<class>/*.jpg``, likewise
``domain_net/``, ``VLCS/``, ``office_home/``, ``terra_incognita/``) and a MoCo-v2-format
checkpoint, written by the tests: the real datasets and weights cannot be downloaded here."""

from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

DOMAINS = {  # DomainBed's dataset folder and its domain folders (sorted: env order)
    "PACS": ("PACS", ["art_painting", "cartoon", "photo", "sketch"]),
    "DomainNet": ("domain_net", ["clipart", "infograph", "painting", "quickdraw", "real",
                                 "sketch"]),
    "VLCS": ("VLCS", ["Caltech101", "LabelMe", "SUN09", "VOC2007"]),
    "OfficeHome": ("office_home", ["Art", "Clipart", "Product", "Real World"]),
    "TerraIncognita": ("terra_incognita", ["location_100", "location_38", "location_43",
                                           "location_46"]),
}


def write_images(root: Path, dataset: str, classes: int = 2, per_class: int = 5,
                 size: int = 8) -> Path:
    """``root/<dataset folder>/<domain>/<class>/<i>.jpg``: random colour images whose mean
    brightness depends on the class (so there is something to learn); returns ``root``."""
    folder, domains = DOMAINS[dataset]
    rng = np.random.default_rng(0)
    for d, domain in enumerate(domains):
        for c in range(classes):
            target = root / folder / domain / f"class{c}"
            target.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = 40 + 160 * c / max(classes - 1, 1) + 10 * d
                pixels = np.clip(rng.normal(base, 30, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(target / f"{i}.jpg")
    return root


def write_moco(path: Path, resnet18: bool = True, seed: int = 0) -> Path:
    """A MoCo-v2 style checkpoint (``state_dict`` with ``module.encoder_q.*`` keys and an MLP
    head) of a random torchvision ResNet."""
    torch.manual_seed(seed)
    net = (torchvision.models.resnet18 if resnet18 else torchvision.models.resnet50)(weights=None)
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()
             if not k.startswith("fc.")}
    state.update({"module.encoder_q.fc.0.weight": torch.randn(8, net.fc.in_features),
                  "module.encoder_q.fc.0.bias": torch.zeros(8)})
    torch.save({"epoch": 800, "arch": "resnet", "state_dict": state}, path)
    return path
