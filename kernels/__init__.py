"""fastvae's Triton kernels: one module per op family (kernels and launchers). The likelihoods
of one target per element (``bernoulli_nll``, ``continuous_bernoulli_nll``, ``gaussian_nll``)
share the kernels of ``_likelihood.py``: their modules hold the per-element formulas.

This package is the ``"triton"`` backend: it exports the backend interface documented in
``fastvae/ops/custom_ops.py``. Importing it imports triton; set ``TRITON_INTERPRET=1`` before
that to run the kernels on CPU tensors.
"""

from .bernoulli_nll import bernoulli_nll_bwd, bernoulli_nll_fwd
from .continuous_bernoulli_nll import continuous_bernoulli_nll_bwd, continuous_bernoulli_nll_fwd
from .dmol import discretized_mix_logistic_nll_bwd, discretized_mix_logistic_nll_fwd
from .fsq import finite_scalar_quantize_bwd, finite_scalar_quantize_fwd
from .gaussian_kl import gaussian_kl_bwd, gaussian_kl_fwd
from .gaussian_nll import gaussian_nll_bwd, gaussian_nll_fwd
from .iwae import iwae_bwd, iwae_fwd
from .lfq import lfq_entropy_bwd, lfq_entropy_fwd
from .nearest_code import nearest_code_fwd
from .reparameterize import reparameterize_bwd, reparameterize_fwd
from .residual_vq import residual_vq_bwd, residual_vq_fwd
from .sample_and_kl import sample_and_kl_bwd, sample_and_kl_fwd

__all__ = [
    "bernoulli_nll_bwd",
    "bernoulli_nll_fwd",
    "continuous_bernoulli_nll_bwd",
    "continuous_bernoulli_nll_fwd",
    "discretized_mix_logistic_nll_bwd",
    "discretized_mix_logistic_nll_fwd",
    "finite_scalar_quantize_bwd",
    "finite_scalar_quantize_fwd",
    "gaussian_kl_bwd",
    "gaussian_kl_fwd",
    "gaussian_nll_bwd",
    "gaussian_nll_fwd",
    "iwae_bwd",
    "iwae_fwd",
    "lfq_entropy_bwd",
    "lfq_entropy_fwd",
    "nearest_code_fwd",
    "reparameterize_bwd",
    "reparameterize_fwd",
    "residual_vq_bwd",
    "residual_vq_fwd",
    "sample_and_kl_bwd",
    "sample_and_kl_fwd",
]
