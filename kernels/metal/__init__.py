"""Metal kernels for Apple MPS, compiled with torch.mps.compile_shader.

sae.metal   the epilogue shaders (bias + ReLU + statistics, masked gradient, squared error)
step.py     the shader library, host launchers, the autograd function, `sae_step`

Importing this package needs no Apple hardware; the shaders compile on first use.
"""

from .step import MetalStep, check_inputs, sae_step

__all__ = ["MetalStep", "check_inputs", "sae_step"]
