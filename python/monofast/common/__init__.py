"""What every stage shares: errors, files, log, config, checkpoint, device, distributed.
Imports no stage, and nothing of `monofast.run` or `monofast.cli`."""
