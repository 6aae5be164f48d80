"""Triton kernels (CUDA; tested on the CPU with TRITON_INTERPRET=1)."""
