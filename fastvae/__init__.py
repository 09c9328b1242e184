"""fastvae: fused kernels for variational autoencoders, as autograd-aware torch custom ops.

    import fastvae as fv
    z, kl = fv.sample_and_kl(mu, logvar)
    loss = fv.bernoulli_nll(decoder(z), x) + kl
"""

from __future__ import annotations

from . import reference
from ._backend import backends, get_backend, set_backend, use_backend
from ._validation import set_validation, validation_enabled
from .functional import (
    bernoulli_nll,
    gaussian_kl,
    gaussian_nll,
    iwae_log_likelihood,
    reparameterize,
    sample_and_kl,
    vae_loss,
)
from .losses import BernoulliNLLLoss, GaussianKLLoss, GaussianNLLLoss

__version__ = "0.1.0"

__all__ = [
    "BernoulliNLLLoss",
    "GaussianKLLoss",
    "GaussianNLLLoss",
    "__version__",
    "backends",
    "bernoulli_nll",
    "gaussian_kl",
    "gaussian_nll",
    "get_backend",
    "iwae_log_likelihood",
    "reference",
    "reparameterize",
    "sample_and_kl",
    "set_backend",
    "set_validation",
    "use_backend",
    "vae_loss",
    "validation_enabled",
]
