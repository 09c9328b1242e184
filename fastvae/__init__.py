"""fastvae: fused kernels for variational autoencoders, as autograd-aware torch custom ops.

    import fastvae as fv
    z, kl = fv.sample_and_kl(mu, logvar)
    loss = fv.bernoulli_nll(decoder(z), x) + kl

On top of the ops: ``fv.VAE`` / ``fv.build_vae`` (the model API) and ``fv.train`` with
``fv.TrainConfig`` (the trainer behind ``fastvae train``).
"""

from __future__ import annotations

from .models.vae import VAE, VAEOutput, build_vae
from .ops import reference
from .ops.backends import backends, get_backend, set_backend, use_backend
from .ops.functional import (
    bernoulli_nll,
    gaussian_kl,
    gaussian_nll,
    iwae_log_likelihood,
    reparameterize,
    sample_and_kl,
    vae_loss,
)
from .ops.losses import BernoulliNLLLoss, GaussianKLLoss, GaussianNLLLoss
from .ops.validation import set_validation, validation_enabled
from .training.trainer import NonFiniteLossError, TrainConfig, TrainResult, train

# isort: split
# -- drop-in objects, per-dimension KL, checkpoints (exports listed at the end) ---------------
from .ops.distributions import DiagonalGaussianDistribution, DiagonalNormal
from .ops.functional import gaussian_kl_per_dim
from .training.checkpoint import load_vae, save_vae

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "BernoulliNLLLoss",
    "GaussianKLLoss",
    "GaussianNLLLoss",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "VAEOutput",
    "__version__",
    "backends",
    "bernoulli_nll",
    "build_vae",
    "gaussian_kl",
    "gaussian_nll",
    "get_backend",
    "iwae_log_likelihood",
    "reference",
    "reparameterize",
    "sample_and_kl",
    "set_backend",
    "set_validation",
    "train",
    "use_backend",
    "vae_loss",
    "validation_enabled",
]

# -- drop-in objects, per-dimension KL, checkpoints ------------------------------------------
__all__ += ["DiagonalGaussianDistribution", "DiagonalNormal", "gaussian_kl_per_dim", "load_vae",
            "save_vae"]
