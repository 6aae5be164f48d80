"""Metal kernels for Apple MPS, compiled with torch.mps.compile_shader."""
