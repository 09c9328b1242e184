"""Pictures of a trained VAE or VQ-VAE: image grids (Pillow), the loss curve, the per-dimension
KL and the code-usage histogram (matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def save_grid(images: Tensor, path: str | Path, ncols: int, *, min_size: int = 256,
              pad: int = 1) -> Path:
    """Tile images ``(n, C, H, W)`` in [0, 1] (C = 1 or 3) row by row into one PNG, scaled up
    by an integer factor (nearest neighbour) so small images stay visible."""
    from PIL import Image

    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    nrows = -(-n // ncols)
    canvas = torch.ones(c, nrows * (h + pad) + pad, ncols * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y:y + h, x:x + w] = images[i]
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array[..., 0] if c == 1 else array)
    scale = max(1, -(-min_size // max(image.width, image.height)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    image.save(path)
    return path


def save_loss_curve(history: Sequence[dict], path: str | Path) -> Path:
    """Train loss and validation negative ELBO (and KL) per epoch, nats per example; for a
    VQ-VAE's history (``VQEpochMetrics``) the train loss and the validation loss and
    reconstruction NLL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if "val_elbo" in history[0]:
        ax.plot(epochs, [h["train_loss"] for h in history], label="train loss (with beta)")
        ax.plot(epochs, [-h["val_elbo"] for h in history], label="validation -ELBO")
        ax.plot(epochs, [h["val_kl"] for h in history], label="validation KL", linestyle="--")
    else:
        ax.plot(epochs, [h["train_loss"] for h in history], label="train loss (NLL + VQ loss)")
        ax.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
        ax.plot(epochs, [h["val_nll"] for h in history], label="validation reconstruction NLL",
                linestyle="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per example")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> Path:
    """Lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


@torch.no_grad()
def latent_traversal(model, x: Tensor, values: Sequence[float] | Tensor | None = None
                     ) -> Tensor:
    """Decoded latent traversals of one image ``x`` ``(C, H, W)`` (or ``(1, C, H, W)``): row d
    sets latent dimension d (of the flattened latent) to each of ``values`` (default 9 values
    evenly spaced over [-3, 3], in prior standard deviations) and keeps every other dimension
    at ``x``'s posterior mean. Returns the likelihood's means ``(D, len(values), C, H, W)``."""
    x = x if x.dim() == 4 else x.unsqueeze(0)
    if x.shape[0] != 1:
        raise ValueError(f"latent_traversal takes one image, got a batch of {x.shape[0]}")
    device = next(model.parameters()).device
    model.eval()
    mu, _ = model.encode(x.to(device))
    flat = mu.flatten(1)[0]
    values = torch.as_tensor(torch.linspace(-3, 3, 9) if values is None else values,
                             dtype=flat.dtype, device=device).flatten()
    d, k = flat.numel(), values.numel()
    z = flat.expand(d, k, d).clone()
    z[torch.arange(d), :, torch.arange(d)] = values
    decoded = model.mean_of(model.decode(z.reshape(d * k, *mu.shape[1:])))
    return decoded.reshape(d, k, *decoded.shape[1:])


def save_traversals(model, x: Tensor, path: str | Path,
                    values: Sequence[float] | Tensor | None = None) -> Path:
    """``latent_traversal(model, x, values)`` as a PNG: one row per latent dimension (top:
    dimension 0), one column per value (left: -3)."""
    grid = latent_traversal(model, x, values)
    return save_grid(grid.flatten(0, 1), path, grid.shape[1])


@torch.no_grad()
def save_kl_bars(model, data: Tensor, path: str | Path, *, threshold: float = 0.01,
                 batch_size: int = 512) -> Path:
    """A bar chart of the KL (nats, mean over ``data``) of each latent dimension, the active
    units (variance over ``data`` of the posterior mean above ``threshold``, Burda et al.
    2016) in colour with a marker above the bar, the inactive ones in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from ..models.vae import active_units

    device = next(model.parameters()).device
    model.eval()
    mus, kls = [], []
    for start in range(0, data.shape[0], batch_size):
        x = data[start:start + batch_size].to(device)
        mus.append(model.encode(x)[0].float().cpu())
        kls.append(model.kl_per_dimension(x).double().cpu().flatten() * x.shape[0])
    kl = (torch.stack(kls).sum(0) / data.shape[0]).numpy()
    n_active, variance = active_units(torch.cat(mus), threshold)
    active = (variance > threshold).numpy()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * kl.size + 1.5), 3.5), dpi=120)
    dims = np.arange(kl.size)
    styles = {"active": {"facecolor": "tab:blue"},
              "inactive": {"facecolor": "lightgrey", "edgecolor": "grey"}}
    ax.bar(dims[active], kl[active], **styles["active"])
    ax.bar(dims[~active], kl[~active], **styles["inactive"])
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats per example)")
    ax.set_title(f"{n_active}/{kl.size} active units (Var[mu] > {threshold:g})")
    if kl.size <= 32:
        ax.set_xticks(dims)
    top = max(float(kl.max()), 1e-3)
    # A marker above every active bar: an active unit may carry little KL (a short bar).
    ax.scatter(dims[active], kl[active] + 0.04 * top, marker="v", color="tab:blue", zorder=3)
    ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
    ax.grid(axis="y", alpha=0.3)
    # Legend entries drawn by hand: a group with no bars would show the default colour.
    ax.legend(handles=[Patch(label=k, **v) for k, v in styles.items()], loc="upper right",
              ncol=2)
    return _save_figure(fig, path)


@torch.no_grad()
def save_samples(model, path: str | Path, n: int = 64, *, seed: int = 0,
                 ncols: int | None = None, **options) -> Path:
    """``n`` samples from the prior (``model.sample(n, generator=..., **options)``, noise from a
    generator on the model's device seeded with ``seed``; ``options``: a VQ-VAE's ``prior``),
    ``ncols`` per row (default ceil(sqrt(n)): 8 for 64)."""
    device = next(model.parameters()).device
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    return save_grid(model.sample(n, generator=gen, **options), path,
                     ncols or math.ceil(math.sqrt(n)))


@torch.no_grad()
def save_reconstructions(model, x: Tensor, path: str | Path, ncols: int = 8) -> Path:
    """Each image of ``x`` followed by its reconstruction (``model.reconstruct``), ``ncols``
    images per row (4 pairs for 8)."""
    device = next(model.parameters()).device
    model.eval()
    x = x.to(device)
    pairs = torch.stack([x, model.reconstruct(x)], 1).flatten(0, 1)
    return save_grid(pairs, path, ncols)


@torch.no_grad()
def save_interpolations(model, x: Tensor, path: str | Path, *, pairs: int = 8,
                        steps: int = 10, method: str = "linear") -> Path:
    """One row per pair: ``model.interpolate`` in ``steps`` from ``x[i]`` to
    ``x[pairs + i]`` (``pairs`` at most ``len(x) // 2``), ``method`` linear or slerp."""
    device = next(model.parameters()).device
    model.eval()
    x = x.to(device)
    n = min(pairs, x.shape[0] // 2)
    path_ = model.interpolate(x[:n], x[n:2 * n], steps=steps, method=method)
    return save_grid(path_.transpose(0, 1).flatten(0, 1), path, steps)


@torch.no_grad()
def save_all(model, val_data: Tensor, history: Sequence[dict], out_dir: str | Path, *,
             seed: int = 0) -> list[Path]:
    """samples.png, reconstructions.png (the first 32 validation images), interpolations.png
    (8 pairs of them), traversals.png (around the first validation image),
    kl_per_dimension.png and loss_curve.png. ``fastvae sample``, ``reconstruct`` and
    ``interpolate`` write the first three again from a checkpoint, by the same functions."""
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    x = val_data[:32].to(device)
    paths = [save_samples(model, out_dir / "samples.png", 64, seed=seed),
             save_reconstructions(model, x, out_dir / "reconstructions.png"),
             save_interpolations(model, x, out_dir / "interpolations.png"),
             save_traversals(model, x[0], out_dir / "traversals.png"),
             save_kl_bars(model, val_data, out_dir / "kl_per_dimension.png"),
             save_loss_curve(history, out_dir / "loss_curve.png")]
    return paths


@torch.no_grad()
def save_code_usage(model, data: Tensor, path: str | Path, *, batch_size: int = 512) -> Path:
    """A bar chart of how often each codebook entry of a VQ-VAE is the nearest code of a position
    of ``data``'s encodings (x: the code index, y: the count), unused codes marked in red
    on the axis; one panel per level of a residual VQ (level 0 on top). Each title gives the
    codes used and the perplexity ``exp H`` of the histogram. An implicit codebook too large
    to count densely (FSQ, LFQ past ``trainer.DENSE_COUNTS`` codes) is drawn as the counts of
    its used codes, most used first (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .trainer import code_counts, code_usage

    counter = code_counts(model, data, batch_size)
    K, L = counter.codebook_size, counter.levels
    dense = counter.dense_counts()
    fig, axes = plt.subplots(L, 1, squeeze=False, dpi=120,
                             figsize=(min(12.0, max(6.0, 0.08 * K + 2)) if dense is not None
                                      else 6.0, 3.5 if L == 1 else 1.1 + 2.2 * L))
    for level, (ax, counts) in enumerate(zip(axes[:, 0], counter.counts(), strict=True)):
        usage, perplexity = code_usage(counts, K)
        used = int((counts > 0).sum())
        counts = counts.numpy()
        if dense is not None:
            codes = np.arange(K)
            ax.bar(codes, counts, width=1.0 if K > 64 else 0.8, color="tab:blue")
            unused = codes[counts == 0]
            if unused.size:
                ax.scatter(unused, np.zeros(unused.size), marker="|", color="tab:red",
                           zorder=3)
            ax.set_xlim(-1, K)
            ax.set_xlabel("code")
            what = "unused in red"
        else:
            ranked = np.sort(counts[counts > 0])[::-1]
            ax.bar(np.arange(ranked.size), ranked, width=1.0, color="tab:blue")
            ax.set_yscale("log")
            ax.set_xlabel("used codes, most used first")
            what = "implicit codebook"
        ax.set_ylabel("positions")
        line = (f"{used}/{K} codes used ({usage:.0%}; {what}), perplexity {perplexity:.1f}, on "
                f"{data.shape[0]} images")
        if L > 1:
            line = (f"level {level}: {used}/{K} codes used ({usage:.0%}), perplexity "
                    f"{perplexity:.1f}")
        ax.set_title(line, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    if L > 1:
        fig.suptitle(f"residual VQ, {L} levels, on {data.shape[0]} images"
                     + ("; unused codes in red" if dense is not None else ""), fontsize=10)
    return _save_figure(fig, path)


@torch.no_grad()
def save_all_vq(model, val_data: Tensor, history: Sequence[dict], out_dir: str | Path, *,
                seed: int = 0) -> list[Path]:
    """A VQ-VAE's pictures: samples.png (64 images decoded from codes drawn independently at
    each position from the model's default prior: the empirical one, the code histogram of
    the last training steps, or uniform for a quantizer that keeps no histogram),
    reconstructions.png (the first 32 validation images), code_usage.png (the validation
    set's code histogram, one panel per level of a residual VQ) and loss_curve.png. No
    interpolations, traversals or KL bars: the latent is discrete (a straight path between
    two encodings leaves the codebook)."""
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    x = val_data[:32].to(device)
    return [save_samples(model, out_dir / "samples.png", 64, seed=seed),
            save_reconstructions(model, x, out_dir / "reconstructions.png"),
            save_code_usage(model, val_data, out_dir / "code_usage.png"),
            save_loss_curve(history, out_dir / "loss_curve.png")]
