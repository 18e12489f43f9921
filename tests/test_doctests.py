"""Every public docstring example in the core modules runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "torch_qmprune",
    "torch_qmprune.calibration",
    "torch_qmprune.importance",
    "torch_qmprune.structural",
    "torch_qmprune.serialization",
    "torch_qmprune.schedule",
    "torch_qmprune.dynamics",
    "torch_qmprune.hardware",
    "torch_qmprune.policy",
    "torch_qmprune.lowrank",
    "torch_qmprune.graph",
    "torch_qmprune.heads",
    "torch_qmprune._transaction",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
