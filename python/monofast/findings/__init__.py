"""Stage 6: the paper's other findings, reproduced on the run's models.

- feature splitting: a family of SAEs of growing width on the same activations, each
  feature matched to its parent in the next smaller SAE and its children in the next larger;
- universality: a second GPT of the same recipe and another seed, its own SAE, and the
  best-correlated feature (and neuron) of the other model for every feature (and neuron);
- specificity and sensitivity: per activation level, which source the tokens come from;
- steering: sampling with a feature clamped at the hook (the SAE's error term spliced back),
  and how often the continuation turns to the feature's source.
"""
