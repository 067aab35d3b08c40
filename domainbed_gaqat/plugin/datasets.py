"""RotatedDigits: an offline DomainBed dataset.

The 1,797 8x8 handwritten digits that ship inside scikit-learn, split into six domains
rotated by 0/15/30/45/60/75 degrees as DomainBed's RotatedMNIST, upsampled to 32x32, three
channels, ImageNet-normalised like DomainBed's image datasets. No download, so the whole
pipeline (sweep, train, collect_results) runs on any machine.
"""

import torch
import torch.nn.functional as F
from domainbed.datasets import MultipleDomainDataset
from torch.utils.data import TensorDataset
from torchvision.transforms.functional import rotate

DATASETS = ["RotatedDigits"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RotatedDigits(MultipleDomainDataset):
    ENVIRONMENTS = ["0", "15", "30", "45", "60", "75"]
    INPUT_SHAPE = (3, 32, 32)
    N_STEPS = 300
    CHECKPOINT_FREQ = 50
    N_WORKERS = 0  # in-memory tensors

    def __init__(self, root, test_envs, hparams):
        super().__init__()
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        images, labels = images[order], labels[order]
        images = F.interpolate(images, size=self.INPUT_SHAPE[1:], mode="bilinear",
                               align_corners=False).repeat(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        n = len(self.ENVIRONMENTS)
        self.datasets = []
        for i, angle in enumerate(self.ENVIRONMENTS):
            rotated = rotate(images[i::n], float(angle))
            self.datasets.append(TensorDataset((rotated - mean) / std, labels[i::n]))
        self.input_shape = self.INPUT_SHAPE
        self.num_classes = 10
