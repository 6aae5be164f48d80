"""Fused sparse-autoencoder kernels, shipped inside the wheel as `monofast.kernels`.

`reference.py` holds the eager PyTorch oracle of the fused SAE step (forward and
backward); `eager.py` the same step tuned for CPUs (the `torch` backend); `triton/` the
CUDA kernels and `metal/` the Apple MPS kernels implement the same contract.
`sparse.py` is the step's sparse form (over the firing features only; Triton's is
`triton/sparse.py`), `native_sparse.py` wraps its native CPU kernels, and `select.py`
keeps TopK's selection rule fast everywhere. `monofast.sae.backend` chooses between them.
"""
