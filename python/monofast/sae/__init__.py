"""Stage 4: sparse autoencoders trained on the harvested activations (`monofast sae train`).

Modules, in reading order: model (SAEConfig, SparseAutoencoder, its files), backend (which
kernels run the fused step), config (SAETrainConfig), batches (the training / held-out
split and the batches), sweep (the SAEs that train side by side, one step of each),
resample (dead features), search (--target-l0), graph (the step as a CUDA graph), resume
(checkpoints), evaluate (every metric: training curves, held-out rows, CE-loss
recovered), train (the loop and the stage driver).
"""
