"""Test-suite set-up shared by every test module.

Without a GPU, Triton kernels run under the interpreter on CPU tensors: TRITON_INTERPRET must be set
before triton is first imported, so it is set here (GPU runners keep real Triton).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))
