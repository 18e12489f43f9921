"""Shared fixtures: small deterministic models and real Fashion-MNIST slices (per session)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def _have_fmnist() -> bool:
    from torch_qmprune.data import FASHION_MNIST_DIRS

    roots = [os.environ.get("QMPRUNE_FASHION_MNIST"), *FASHION_MNIST_DIRS]
    return any(r and os.path.exists(os.path.join(r, "t10k-labels-idx1-ubyte.gz")) for r in roots)


requires_fmnist = pytest.mark.skipif(not _have_fmnist(),
                                     reason="Fashion-MNIST idx files not installed")


@pytest.fixture(scope="session")
def fmnist_small():
    """4,000 training and 2,000 test images of the real Fashion-MNIST."""
    if not _have_fmnist():
        pytest.skip("Fashion-MNIST idx files not installed")
    from torch_qmprune.data import load_fashion_mnist

    x, y = load_fashion_mnist("train", limit=4000)
    xt, yt = load_fashion_mnist("test", limit=2000)
    return x, y, xt, yt


@pytest.fixture(scope="session")
def trained_small_cnn(fmnist_small):
    """SmallCNN trained 3 epochs on 4,000 real images (about 10 s on 2 cores)."""
    from torch_qmprune.models import small_cnn
    from torch_qmprune.training import train

    x, y, _, _ = fmnist_small
    torch.manual_seed(0)
    model = small_cnn()
    train(model, x, y, epochs=3, lr=0.05, seed=0)
    return model
