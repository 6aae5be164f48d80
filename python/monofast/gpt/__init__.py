"""Stage 2: the tiny GPT (`monofast gpt train`): model, config, batches, trainer, weights,
sample, train (the stage)."""
