"""monofast: Towards Monosemanticity, reproducible and fast.

Train a tiny GPT on Shakespeare + Python, harvest its MLP activations to memory-mapped
shards, train sparse autoencoders with fused kernels, measure them, and browse the
features in a static website.

Importing the package is cheap: torch and the other heavy modules load only in the
stages that use them.
"""

__version__ = "0.1.0"
