"""Fused sparse-autoencoder kernels, shipped inside the wheel as `monofast.kernels`.

`reference.py` holds the eager PyTorch oracle of the fused SAE step (forward and
backward); `eager.py` the same step tuned for CPUs (the `torch` backend); `triton/` the
CUDA kernels and `metal/` the Apple MPS kernels implement the same contract.
`monofast.sae.backend` chooses between them.
"""
