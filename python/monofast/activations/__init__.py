"""Stage 3: the activation store (`monofast activations harvest`): store (the Python face of
the Rust store), harvest (the stage)."""
