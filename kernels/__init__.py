"""Fused sparse-autoencoder kernels, shipped inside the wheel as `monofast.kernels`.

`reference.py` holds the eager PyTorch oracle of every fused op; `triton/` the CUDA
kernels and `metal/` the Apple MPS kernels implement the same contract.
"""
