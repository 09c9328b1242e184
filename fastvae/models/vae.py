"""A thin VAE around a user's encoder and decoder, every loss term and sample on the fused ops.

    encoder: x -> (mu, logvar), or one moments tensor holding both on dim 1:
             (B, 2 * C, *spatial) for a latent (C, *spatial) (the latent-diffusion layout;
             (B, 2 * D) for a flat latent), or (B, 2 * numel) flat for any latent shape
    decoder: z -> logits (Bernoulli likelihoods) or mean (Gaussian), of x's shape

Likelihoods: ``"bernoulli"`` (logits), ``"gaussian"`` (fixed ``obs_logvar``),
``"gaussian_learned"`` (one learned log-variance shared by every pixel, bounded below by
``min_obs_var``), ``"continuous_bernoulli"`` (logits; the normalized likelihood of
intensities in [0, 1]), and ``"dmol"``: the discretized mixture of logistics of PixelCNN++
(decoder output ``(B, M (1 + 3C), H, W)``, or ``3M`` channels for C = 1; ``x`` in [0, 1] on the
grid of ``n_bins`` levels, scaled to [-1, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..ops import functional as F
from ..ops import reference
from ..ops import validation as check
from ..ops.losses import soft_min_logvar

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned", "continuous_bernoulli", "dmol")


class VAEOutput(NamedTuple):
    """What ``VAE.forward`` returns: the loss (negative ELBO, with beta) and its parts."""

    loss: Tensor
    nll: Tensor
    kl: Tensor
    z: Tensor
    mu: Tensor
    logvar: Tensor
    recon: Tensor


class VAE(nn.Module):
    """Variational autoencoder with a diagonal-Gaussian posterior and a N(0, I) prior.

    ``latent_shape``: the shape of one latent sample (an int for a flat latent).
    ``logvar_limit``: optional soft clamp of the posterior log-variance to (-limit, limit),
    ``limit * tanh(logvar / limit)``, for models whose variances run away.
    ``min_obs_var``: the floor of the learned observation variance (``"gaussian_learned"``):
    the variance used is ``exp(obs_logvar) + min_obs_var`` (``soft_min_logvar``, the soft clip
    of σ-VAE), so that it cannot collapse to 0 and its gradient never stops abruptly.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_shape: int | Sequence[int],
                 *, likelihood: str = "bernoulli", obs_logvar: float = 0.0, beta: float = 1.0,
                 free_bits: float = 0.0, logvar_limit: float | None = None,
                 min_obs_var: float = 1e-6, n_mixtures: int = 10, n_bins: int = 256) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, "
                             f"got {likelihood!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.latent_shape = _shape("latent_shape", latent_shape)
        self.likelihood = likelihood
        self.beta = float(beta)
        self.free_bits = float(free_bits)
        if logvar_limit is not None and not logvar_limit > 0:
            raise ValueError(f"logvar_limit must be > 0, got {logvar_limit}")
        self.logvar_limit = logvar_limit
        if not 0 <= min_obs_var < math.inf:
            raise ValueError(f"min_obs_var must be finite and >= 0, got {min_obs_var}")
        self.min_obs_var = float(min_obs_var)
        self.obs_logvar: float | nn.Parameter = float(obs_logvar)
        self.n_mixtures = check.integer("n_mixtures", n_mixtures, 1)
        self.n_bins = check.integer("n_bins", n_bins, 2)
        if likelihood == "gaussian_learned":
            self.obs_logvar = nn.Parameter(torch.tensor(float(obs_logvar)))

    # -- model pieces ---------------------------------------------------------------------

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters ``(mu, logvar)``, each ``(B, *latent_shape)``."""
        out = self.encoder(x)
        if isinstance(out, (tuple, list)):
            mu, logvar = out
        else:
            mu, logvar = self._split_moments(out)
        shape = (x.shape[0], *self.latent_shape)
        if self.logvar_limit is not None:
            logvar = self.logvar_limit * torch.tanh(logvar / self.logvar_limit)
        return mu.reshape(shape), logvar.reshape(shape)

    def _split_moments(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """One moments tensor -> (mu, logvar), split on dim 1: ``(B, 2 * C, *spatial)`` for the
        latent ``(C, *spatial)``, or ``(B, 2 * numel)`` (a flat head). Any other layout is
        ambiguous (a split elsewhere could mix means and log-variances): ValueError."""
        latent = self.latent_shape
        layered = (2 * latent[0], *latent[1:])
        flat = 2 * math.prod(latent)
        if tuple(out.shape[1:]) == layered or (out.dim() == 2 and out.shape[1] == flat):
            return out.chunk(2, dim=1)
        raise ValueError(
            f"the encoder returned one tensor of shape {tuple(out.shape)}; for latent_shape "
            f"{latent} a moments tensor holds mean and log-variance on dim 1: shape "
            f"(B, {', '.join(map(str, layered))}) or (B, {flat}). Return (mu, logvar) for "
            "another layout")

    def decode(self, z: Tensor) -> Tensor:
        """Decoder output: logits (Bernoulli) or mean (Gaussian)."""
        return self.decoder(z)

    def mean_of(self, recon: Tensor) -> Tensor:
        """The likelihood's mean from a decoder output: sigmoid(logits), the continuous
        Bernoulli's mean ``1/2 + coth(l/2)/2 - 1/l`` (not sigmoid(l)), or the mean itself; for
        ``"dmol"`` the mixture's most likely value (channel by channel), in [0, 1]."""
        if self.likelihood == "continuous_bernoulli":
            return continuous_bernoulli_mean(recon)
        if self.likelihood == "dmol":
            return (F.discretized_mix_logistic_sample(recon, n_mixtures=self.n_mixtures,
                                                      n_bins=self.n_bins, most_likely=True)
                    + 1.0) / 2.0
        return torch.sigmoid(recon) if self.likelihood == "bernoulli" else recon

    def nll(self, recon: Tensor, x: Tensor, reduction: str = "mean") -> Tensor:
        """-log p(x | z) for a decoder output. ``x`` keeps its dtype: under autocast the decoder
        may return bfloat16 and the loss computes in float32 (the ops promote the data, never
        round it)."""
        if self.likelihood == "bernoulli":
            return F.bernoulli_nll(recon, x, reduction=reduction)
        if self.likelihood == "continuous_bernoulli":
            return F.continuous_bernoulli_nll(recon, x, reduction=reduction)
        if self.likelihood == "dmol":
            return F.discretized_mix_logistic_nll(recon, 2.0 * x - 1.0, n_mixtures=self.n_mixtures,
                                                  n_bins=self.n_bins, reduction=reduction)
        logvar = self.obs_logvar
        if isinstance(logvar, nn.Parameter):
            # a float32 parameter meets a bfloat16 mean under autocast: compute in float32
            logvar = soft_min_logvar(logvar, self.min_obs_var)
            dtype = torch.promote_types(recon.dtype, logvar.dtype)
            recon, logvar = recon.to(dtype), logvar.to(dtype)
        return F.gaussian_nll(recon, x, logvar, reduction=reduction)

    # -- training objective ----------------------------------------------------------------

    def forward(self, x: Tensor, *, beta: float | None = None, free_bits: float | None = None,
                reduction: str = "mean", seed: int | None = None) -> VAEOutput:
        """Negative ELBO ``nll + beta * kl`` with one reparameterized sample (fused
        sample-and-KL), and its parts."""
        beta = self.beta if beta is None else beta
        free_bits = self.free_bits if free_bits is None else free_bits
        mu, logvar = self.encode(x)
        z, kl = F.sample_and_kl(mu, logvar, reduction=reduction, free_bits=free_bits, seed=seed)
        recon = self.decode(z)
        nll = self.nll(recon, x, reduction)
        return VAEOutput(nll + beta * kl, nll, kl, z, mu, logvar, recon)

    # -- inference -------------------------------------------------------------------------

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of the likelihood's mean at prior samples ``z ~ N(0, I)``."""
        n = check.integer("n", n, 0)
        device, dtype = self._device_dtype()
        z = torch.randn((n, *self.latent_shape), device=device, dtype=dtype, generator=generator)
        return self.mean_of(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The likelihood's mean at the posterior mean: ``mean(decode(mu(x)))``."""
        mu, _ = self.encode(x)
        return self.mean_of(self.decode(mu))

    @torch.no_grad()
    def interpolate(self, x1: Tensor, x2: Tensor, steps: int = 8,
                    method: str = "linear") -> Tensor:
        """Decoded paths between the posterior means of two batches of equal shape:
        ``(steps, *x1.shape)``, from ``x1`` (step 0) to ``x2``. ``method``: ``"linear"`` or
        ``"slerp"`` (spherical, which keeps the path near the prior's typical radius)."""
        if method not in ("linear", "slerp"):
            raise ValueError(f"method must be 'linear' or 'slerp', got {method!r}")
        steps = check.integer("steps", steps, 2)
        if x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must have equal shapes, got {tuple(x1.shape)} and "
                             f"{tuple(x2.shape)}")
        z1, _ = self.encode(x1)
        z2, _ = self.encode(x2)
        t = torch.linspace(0, 1, steps, device=z1.device, dtype=z1.dtype)
        t = t.view(steps, *([1] * z1.dim()))
        path = (1 - t) * z1 + t * z2 if method == "linear" else _slerp(z1, z2, t)
        decoded = self.mean_of(self.decode(path.reshape(-1, *z1.shape[1:])))
        return decoded.reshape(steps, *x1.shape)

    @torch.no_grad()
    def log_likelihood(self, x: Tensor, n_samples: int = 1000, *, chunk_size: int = 100,
                       on_chunk: Callable[[int], object] | None = None) -> Tensor:
        """Importance-sampled ``log p(x)`` (IWAE bound with K = ``n_samples``), shape (B,).
        Streams over K in chunks (running log-sum-exp), so K = 5000 fits in memory;
        ``on_chunk(k)`` is called after each chunk of k samples (a progress bar's update)."""
        n_samples = check.integer("n_samples", n_samples, 1)
        chunk_size = check.integer("chunk_size", chunk_size, 1)
        mu, logvar = self.encode(x)
        total = None
        for start in range(0, n_samples, chunk_size):
            k = min(chunk_size, n_samples - start)
            z = F.reparameterize(mu, logvar, n_samples=k)
            recon = self.decode(z.reshape(-1, *mu.shape[1:]))
            x_rep = x.unsqueeze(0).expand(k, *x.shape).reshape(-1, *x.shape[1:])
            log_px = -self.nll(recon, x_rep, reduction="none").view(k, x.shape[0])
            chunk = F.iwae_log_likelihood(log_px, z, mu, logvar) + math.log(k)
            total = chunk if total is None else torch.logaddexp(total, chunk)
            if on_chunk is not None:
                on_chunk(k)
        return total - math.log(n_samples)

    @torch.no_grad()
    def anomaly_score(self, x: Tensor, n_samples: int = 16, *, seed: int | None = None,
                      bound: str = "elbo", chunk_size: int = 100) -> Tensor:
        """Per-sample score, shape (B,), high means unusual: ``-log p(x)`` estimated from
        ``n_samples`` posterior samples.

        ``bound="elbo"``: the negative ELBO with the analytic KL and the reconstruction NLL
        averaged over the samples, ``mean_k[-log p(x|z_k)] + KL(q(z|x) || p(z))`` (its noise
        falls as ``1 / sqrt(n_samples)``). ``"iwae"``: the negative importance-weighted bound
        ``-(logsumexp_k log w_k - log K)`` (Burda et al. 2016), tighter, as
        ``log_likelihood``. ``seed``: the same int gives the same score (the noise comes from
        a generator seeded with it); None draws from torch's generator. Decodes in chunks of
        ``chunk_size`` samples.
        """
        if bound not in ("elbo", "iwae"):
            raise ValueError(f"bound must be 'elbo' or 'iwae', got {bound!r}")
        n_samples = check.integer("n_samples", n_samples, 1)
        chunk_size = check.integer("chunk_size", chunk_size, 1)
        seed = None if seed is None else check.integer("seed", seed)
        mu, logvar = self.encode(x)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=mu.device).manual_seed(seed)
        B = x.shape[0]
        total = None
        for start in range(0, n_samples, chunk_size):
            k = min(chunk_size, n_samples - start)
            z = F.reparameterize(mu, logvar, n_samples=k, generator=generator)
            recon = self.decode(z.reshape(-1, *mu.shape[1:]))
            x_rep = x.unsqueeze(0).expand(k, *x.shape).reshape(-1, *x.shape[1:])
            log_px = -self.nll(recon, x_rep, reduction="none").view(k, B)
            if bound == "elbo":
                chunk = log_px.sum(0)
                total = chunk if total is None else total + chunk
            else:
                chunk = F.iwae_log_likelihood(log_px, z, mu, logvar) + math.log(k)
                total = chunk if total is None else torch.logaddexp(total, chunk)
        if bound == "elbo":
            return F.gaussian_kl(mu, logvar, reduction="none") - total / n_samples
        return math.log(n_samples) - total

    @torch.no_grad()
    def kl_per_dimension(self, x: Tensor) -> Tensor:
        """Batch-mean KL of each latent dimension, shape ``latent_shape``
        (``fastvae.gaussian_kl_per_dim`` of the posterior, float32)."""
        mu, logvar = self.encode(x)
        return F.gaussian_kl_per_dim(mu, logvar)


def _shape(name: str, value: int | Sequence[int]) -> tuple[int, ...]:
    """A shape given as one integer or a sequence of them (each any ``__index__`` integer,
    numpy's included) as a tuple of Python ints >= 1."""
    if isinstance(value, (Sequence, Tensor)) and not isinstance(value, str):
        return tuple(check.integer(f"{name}[{i}]", v, 1) for i, v in enumerate(value))
    return (check.integer(name, value, 1),)


def _slerp(z1: Tensor, z2: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation per example (latent flattened; ``t``: ``(steps, 1, ...)``):
    ``sin((1 - t) w) / sin w * z1 + sin(t w) / sin w * z2`` (Shoemake 1985).

    The angle is ``w = atan2(|b_perp|, b_par)`` from the parts of ``z2`` perpendicular and
    parallel to ``z1``, accurate over [0, pi] (``acos`` of a rounded cosine loses half the
    digits near 0 and pi). The same path is evaluated in the plane of ``z1`` and ``b_perp``,
    ``(|z1| cos tw + (|z2| - |z1|) cos w sin tw / sin w) z1 / |z1| + |z2| sin tw u``, with no
    cancellation between large weights near w = pi; it is linear only at w = 0 (where
    ``sin tw / sin w`` -> t) and when an endpoint is 0. Computed in float64: near w = pi the
    path's sensitivity to the endpoints' norms grows as 1 / sin w."""
    dtype = torch.float64
    a, b = z1.flatten(1).to(dtype), z2.flatten(1).to(dtype)
    tt = t.reshape(-1, 1, 1).to(dtype)
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    a_hat = a / torch.where(na > 0, na, 1.0)
    par = (a_hat * b).sum(1, keepdim=True)
    perp = b - par * a_hat
    n_perp = perp.norm(dim=1, keepdim=True)
    u = perp / torch.where(n_perp > 0, n_perp, 1.0)
    omega = torch.atan2(n_perp, par)
    sin_t = torch.sin(tt * omega)
    ratio = torch.where(omega > 0, sin_t / torch.where(omega > 0, torch.sin(omega), 1.0), tt)
    along = na * torch.cos(tt * omega) + (nb - na) * torch.cos(omega) * ratio
    path = along * a_hat + nb * sin_t * u
    path = torch.where((na > 0) & (nb > 0), path, (1 - tt) * a + tt * b)
    return path.reshape(-1, *z1.shape).to(z1.dtype)


def active_units(mu: Tensor, threshold: float = 0.01) -> tuple[int, Tensor]:
    """Active units (Burda et al. 2016): a latent unit is active when the variance over the
    data of its posterior mean exceeds ``threshold``. ``mu``: ``(n, *latent)``; returns the
    count and the per-unit variances."""
    variance = mu.double().flatten(1).var(0, unbiased=False)
    return int((variance > threshold).sum()), variance


# -- ready-made encoders and decoders ----------------------------------------------------------


def _mlp(sizes: Sequence[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return layers


def mlp_encoder(input_shape: Sequence[int], latent_dim: int,
                hidden: Sequence[int] = (256, 256)) -> nn.Module:
    """``x (B, *input_shape) -> [mu, logvar] (B, 2 * latent_dim)``."""
    return nn.Sequential(nn.Flatten(), *_mlp([math.prod(input_shape), *hidden, 2 * latent_dim]))


def mlp_decoder(latent_dim: int, output_shape: Sequence[int],
                hidden: Sequence[int] = (256, 256)) -> nn.Module:
    """``z (B, latent_dim) -> (B, *output_shape)``."""
    return nn.Sequential(*_mlp([latent_dim, *hidden, math.prod(output_shape)]),
                         nn.Unflatten(1, tuple(output_shape)))


def conv_encoder(input_shape: Sequence[int], latent_dim: int,
                 channels: Sequence[int] = (32, 64)) -> nn.Module:
    """Strided 4x4 convolutions (each halves H and W), then a linear head:
    ``x (B, C, H, W) -> [mu, logvar] (B, 2 * latent_dim)``."""
    c = input_shape[0]
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.SiLU()]
        c = out
    body = nn.Sequential(*layers)
    with torch.no_grad():
        n_features = body(torch.zeros(1, *input_shape)).numel()
    return nn.Sequential(body, nn.Flatten(), nn.Linear(n_features, 2 * latent_dim))


class _Crop(nn.Module):
    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        self.height, self.width = height, width

    def forward(self, x: Tensor) -> Tensor:
        return x[..., : self.height, : self.width]


def conv_decoder(latent_dim: int, output_shape: Sequence[int],
                 channels: Sequence[int] = (64, 32)) -> nn.Module:
    """Linear to a small feature map, then 4x4 transposed convolutions that each double H and
    W, cropped to ``output_shape``: ``z (B, latent_dim) -> (B, C, H, W)``."""
    c_out, height, width = output_shape
    scale = 2 ** len(channels)
    h0, w0 = -(-height // scale), -(-width // scale)
    return nn.Sequential(nn.Linear(latent_dim, channels[0] * h0 * w0), nn.SiLU(),
                         nn.Unflatten(1, (channels[0], h0, w0)),
                         *upsampling_layers(channels, c_out, height, width))


def upsampling_layers(channels: Sequence[int], c_out: int, height: int,
                      width: int) -> list[nn.Module]:
    """4x4 transposed convolutions through ``channels`` to ``c_out``, each doubling H and W
    (SiLU between them), cropped to ``(height, width)``: the conv decoders' shared tail."""
    layers: list[nn.Module] = []
    for i, c in enumerate(channels):
        nxt = channels[i + 1] if i + 1 < len(channels) else c_out
        layers.append(nn.ConvTranspose2d(c, nxt, 4, stride=2, padding=1))
        if i + 1 < len(channels):
            layers.append(nn.SiLU())
    layers.append(_Crop(height, width))
    return layers


def decoder_output_shape(input_shape: Sequence[int], likelihood: str,
                         n_mixtures: int) -> tuple[int, ...]:
    """What the decoder returns for images of ``input_shape``: the same shape, or for
    ``likelihood="dmol"`` the mixture's parameters, ``(M (1 + 3C) or 3M, H, W)``."""
    if likelihood != "dmol":
        return tuple(input_shape)
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise ValueError(f"likelihood 'dmol' needs (C, H, W) inputs with C = 1 or 3, got "
                         f"{tuple(input_shape)}")
    return (n_mixtures * reference.dmol_params_per_mixture(input_shape[0]), *input_shape[1:])


def build_vae(input_shape: Sequence[int], latent_dim: int, *, arch: str = "mlp",
              hidden: Sequence[int] | None = None, likelihood: str = "bernoulli",
              obs_logvar: float = 0.0, beta: float = 1.0, free_bits: float = 0.0,
              logvar_limit: float | None = None, n_mixtures: int = 10,
              n_bins: int = 256) -> VAE:
    """A VAE with the ready-made MLP (``arch="mlp"``) or convolutional (``"conv"``) networks.
    Its arguments are kept as ``model.build_config``, from which ``load_vae`` rebuilds it.
    ``likelihood="dmol"``: (C, H, W) inputs with C = 1 or 3, the decoder outputs the mixture's
    ``M (1 + 3C)`` (C = 3) or ``3M`` (C = 1) parameter maps, ``M = n_mixtures``. Integer
    arguments may be any ``__index__`` integer (numpy's too); they are kept as Python ints."""
    input_shape = _shape("input_shape", input_shape)
    latent_dim = check.integer("latent_dim", latent_dim, 1)
    if hidden is not None:
        hidden = _shape("hidden", hidden)
    n_mixtures = check.integer("n_mixtures", n_mixtures, 1)
    n_bins = check.integer("n_bins", n_bins, 2)
    config = {"input_shape": list(input_shape), "latent_dim": latent_dim, "arch": arch,
              "hidden": None if hidden is None else list(hidden), "likelihood": likelihood,
              "obs_logvar": obs_logvar, "beta": beta, "free_bits": free_bits,
              "logvar_limit": logvar_limit}
    output_shape = decoder_output_shape(input_shape, likelihood, n_mixtures)
    if likelihood == "dmol":
        config.update(n_mixtures=n_mixtures, n_bins=n_bins)
    if arch == "mlp":
        hidden = tuple(hidden or (256, 256))
        encoder = mlp_encoder(input_shape, latent_dim, hidden)
        decoder = mlp_decoder(latent_dim, output_shape, tuple(reversed(hidden)))
    elif arch == "conv":
        if len(input_shape) != 3:
            raise ValueError(f"arch 'conv' needs (C, H, W) inputs, got {tuple(input_shape)}")
        channels = tuple(hidden or (32, 64))
        encoder = conv_encoder(input_shape, latent_dim, channels)
        decoder = conv_decoder(latent_dim, output_shape, tuple(reversed(channels)))
    else:
        raise ValueError(f"arch must be 'mlp' or 'conv', got {arch!r}")
    model = VAE(encoder, decoder, latent_dim, likelihood=likelihood, obs_logvar=obs_logvar,
                beta=beta, free_bits=free_bits, logvar_limit=logvar_limit, n_mixtures=n_mixtures,
                n_bins=n_bins)
    model.build_config = config
    return model


def continuous_bernoulli_mean(logits: Tensor) -> Tensor:
    """Mean of the continuous Bernoulli with logits ``l``: ``1/2 + coth(l/2)/2 - 1/l`` (1/2 at
    l = 0), which is d nll / dl at target 0; computed by the same cancellation-free forms,
    in ``logits``' dtype."""
    x = torch.zeros_like(logits, dtype=reference.compute_dtype(logits.dtype))
    return reference.continuous_bernoulli_nll_grads(logits.to(x.dtype), x)[0].to(logits.dtype)
