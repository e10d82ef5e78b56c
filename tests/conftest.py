"""Test set-up shared by every test module.

* Without a GPU, Triton kernels run on CPU tensors under Triton's interpreter, which must be
  switched on before triton is imported: done here, first thing.
* Tests marked ``gpu`` need CUDA and are skipped without it (run them on a GPU machine:
  ``pytest -m gpu``).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device the parity tests run on: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
