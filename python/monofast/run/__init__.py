"""The pipeline over the stages: stages, presets, resolve, manifest, pipeline, estimate,
results, report. Imports the stages, never `monofast.cli`."""
