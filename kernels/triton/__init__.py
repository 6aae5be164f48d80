"""Triton kernels for the SAE step (CUDA; tested on the CPU with TRITON_INTERPRET=1).

encode.py   fused encoder forward and its backward epilogue kernel
decode.py   fused decoder forward (with the squared error) and its weight gradient
wgrad.py    the batch-reduction product shared by both weight gradients
step.py     input checks, the autograd function, `sae_step`
sparse.py   the step over the firing features only: `gather_sum`, `sampled_dot`, `sparse_step`
common.py   autotune configs (bypassed under the interpreter), tile order, the K-loop
            of every product (`gemm_tile`), block sums
"""

from .sparse import TritonSparseStep, gather_sum, sampled_dot, sparse_step
from .step import TritonStep, check_inputs, sae_step

__all__ = ["TritonSparseStep", "TritonStep", "check_inputs", "gather_sum", "sae_step", "sampled_dot",
           "sparse_step"]
