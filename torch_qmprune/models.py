"""Reference networks for Fashion-MNIST (1×28×28) used by the demo, the tests and the benchmarks.

Nothing here is downloaded: every model is built from torchvision's constructors or plain
``torch.nn`` and trained locally (see :mod:`torch_qmprune.training`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "small_cnn", "resnet18_fmnist", "small_vit"]


class SmallCNN(nn.Module):
    """The 4-layer CNN of SCIENCE.md §3: conv 32-64-64 with BatchNorm, FC 128, 10 classes."""

    def __init__(self, num_classes: int = 10, width: int = 1) -> None:
        super().__init__()
        c1, c2, c3 = 32 * width, 64 * width, 64 * width
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1, bias=False),
            nn.BatchNorm2d(c3),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * 7 * 7, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def small_cnn(num_classes: int = 10) -> SmallCNN:
    """Build :class:`SmallCNN` (about 0.9 M parameters, 12 M MACs per 28×28 image)."""
    return SmallCNN(num_classes)


def resnet18_fmnist(num_classes: int = 10, *, stem_stride: int = 1) -> nn.Module:
    """torchvision ResNet-18 adapted to 1×28×28 input.

    The stem becomes a 3×3 convolution with one input channel and stride ``stem_stride``
    (1 as in SCIENCE.md's H100 set-up; 2 makes it 4× cheaper for CPU runs), and the max-pool is
    removed, so the four stages see 28/14/7/4 (or 14/7/4/2) pixel maps.
    """
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, 3, stride=stem_stride, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def small_vit(
    num_classes: int = 10,
    *,
    num_layers: int = 4,
    num_heads: int = 8,
    hidden_dim: int = 128,
    mlp_dim: int = 256,
    patch_size: int = 7,
) -> nn.Module:
    """A torchvision ``VisionTransformer`` (the vit_b_16 family) scaled to 1×28×28 images.

    The patch embedding takes one channel (``conv_proj`` replaced), 16 patches of 7×7.
    """
    from torchvision.models import VisionTransformer

    model = VisionTransformer(
        image_size=28,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        num_classes=num_classes,
    )
    model.conv_proj = nn.Conv2d(1, hidden_dim, kernel_size=patch_size, stride=patch_size)
    return model
