"""Kernel tests run the Triton code compiled on a GPU, or under Triton's interpreter on CPU tensors: the
interpreter must be chosen before the kernels module is imported."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
