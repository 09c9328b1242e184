"""fastvae: fused kernels for variational autoencoders, as autograd-aware torch custom ops.

    import fastvae as fv
    z, kl = fv.sample_and_kl(mu, logvar)
    loss = fv.bernoulli_nll(decoder(z), x) + kl

On top of the ops: ``fv.VAE`` / ``fv.build_vae`` (the model API) and ``fv.train`` with
``fv.TrainConfig`` (the trainer behind ``fastvae train``).

The package is layered, each layer importing only those below it: ``fastvae.ops`` (the op
library), ``fastvae.models`` (the VAE), ``fastvae.training`` (trainer, checkpoints, data) and
``fastvae.cli`` (the command line and the benchmark report). ``import fastvae`` loads the ops;
the model and training names load their layer on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .ops import reference
from .ops.backends import backends, get_backend, set_backend, use_backend
from .ops.distributions import DiagonalGaussianDistribution, DiagonalNormal
from .ops.fsq import FSQOutput, finite_scalar_quantize, fsq_codes_to_indices, fsq_indices_to_codes
from .ops.functional import (
    bernoulli_nll,
    continuous_bernoulli_nll,
    discretized_mix_logistic_nll,
    discretized_mix_logistic_sample,
    gaussian_kl,
    gaussian_kl_per_dim,
    gaussian_nll,
    iwae_log_likelihood,
    reparameterize,
    sample_and_kl,
    vae_loss,
)
from .ops.lfq import LFQEntropy, LFQOutput, lfq_entropy, lookup_free_quantize
from .ops.losses import (
    BernoulliNLLLoss,
    ContinuousBernoulliNLLLoss,
    GaussianKLLoss,
    GaussianNLLLoss,
)
from .ops.quantize import VQOutput, nearest_code, vector_quantize
from .ops.residual_quantize import RVQOutput, residual_vector_quantize
from .ops.validation import set_validation, validation_enabled

if TYPE_CHECKING:
    from .models.build import build_vae
    from .models.fsq import FSQ, FiniteScalarQuantizer
    from .models.lfq import LFQ, LookupFreeQuantizer
    from .models.quantizer import QuantizerOutput, VectorQuantize, VectorQuantizer
    from .models.residual_vq import ResidualVectorQuantizer, ResidualVQ
    from .models.vae import VAE, VAEOutput
    from .models.vqvae import VQVAE, VQVAEOutput, build_vqvae
    from .training.checkpoint import load_vae, save_vae
    from .training.trainer import NonFiniteLossError, TrainConfig, TrainResult, train

__version__ = "0.1.0"

# Public names of the higher layers -> their module, imported on first access.
_LAZY = {
    "VAE": "fastvae.models.vae",
    "VAEOutput": "fastvae.models.vae",
    "build_vae": "fastvae.models.build",
    "QuantizerOutput": "fastvae.models.quantizer",
    "FSQ": "fastvae.models.fsq",
    "FiniteScalarQuantizer": "fastvae.models.fsq",
    "VectorQuantize": "fastvae.models.quantizer",
    "VectorQuantizer": "fastvae.models.quantizer",
    "LFQ": "fastvae.models.lfq",
    "LookupFreeQuantizer": "fastvae.models.lfq",
    "VQVAE": "fastvae.models.vqvae",
    "ResidualVQ": "fastvae.models.residual_vq",
    "ResidualVectorQuantizer": "fastvae.models.residual_vq",
    "VQVAEOutput": "fastvae.models.vqvae",
    "build_vqvae": "fastvae.models.vqvae",
    "NonFiniteLossError": "fastvae.training.trainer",
    "TrainConfig": "fastvae.training.trainer",
    "TrainResult": "fastvae.training.trainer",
    "train": "fastvae.training.trainer",
    "load_vae": "fastvae.training.checkpoint",
    "save_vae": "fastvae.training.checkpoint",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastvae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "FSQ",
    "LFQ",
    "VAE",
    "VQVAE",
    "BernoulliNLLLoss",
    "ContinuousBernoulliNLLLoss",
    "DiagonalGaussianDistribution",
    "DiagonalNormal",
    "FSQOutput",
    "FiniteScalarQuantizer",
    "GaussianKLLoss",
    "GaussianNLLLoss",
    "LFQEntropy",
    "LFQOutput",
    "LookupFreeQuantizer",
    "NonFiniteLossError",
    "QuantizerOutput",
    "RVQOutput",
    "ResidualVQ",
    "ResidualVectorQuantizer",
    "TrainConfig",
    "TrainResult",
    "VAEOutput",
    "VQOutput",
    "VQVAEOutput",
    "VectorQuantize",
    "VectorQuantizer",
    "__version__",
    "backends",
    "bernoulli_nll",
    "build_vae",
    "build_vqvae",
    "continuous_bernoulli_nll",
    "discretized_mix_logistic_nll",
    "discretized_mix_logistic_sample",
    "finite_scalar_quantize",
    "fsq_codes_to_indices",
    "fsq_indices_to_codes",
    "gaussian_kl",
    "gaussian_kl_per_dim",
    "gaussian_nll",
    "get_backend",
    "iwae_log_likelihood",
    "lfq_entropy",
    "load_vae",
    "lookup_free_quantize",
    "nearest_code",
    "reference",
    "reparameterize",
    "residual_vector_quantize",
    "sample_and_kl",
    "save_vae",
    "set_backend",
    "set_validation",
    "train",
    "use_backend",
    "vae_loss",
    "validation_enabled",
    "vector_quantize",
]
