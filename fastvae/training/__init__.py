"""Training a VAE: the trainer, checkpoints, data sets and image grids."""
