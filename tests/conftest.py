"""Shared pytest setup: GPU tests skip without CUDA; Triton runs through its interpreter on CPU."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Triton reads TRITON_INTERPRET when its kernels are defined, so set it before any
# test imports proxykern.kernels: on a machine without a GPU it runs on CPU tensors.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
