"""Triton kernels (one module per op family).

They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is
imported) for correctness testing. Nothing here is imported unless a Triton backend is selected.
"""
