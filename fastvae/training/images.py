"""Pictures of a trained VAE: image grids (Pillow) and the loss curve (matplotlib)."""

from __future__ import annotations

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
    """Train loss and validation negative ELBO per epoch (nats per example)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss (with beta)")
    ax.plot(epochs, [-h["val_elbo"] for h in history], label="validation -ELBO")
    ax.plot(epochs, [h["val_kl"] for h in history], label="validation KL", linestyle="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per example")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


@torch.no_grad()
def save_all(model, val_data: Tensor, history: Sequence[dict], out_dir: str | Path, *,
             seed: int = 0) -> list[Path]:
    """samples.png, reconstructions.png, interpolations.png and loss_curve.png."""
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    paths = [save_grid(model.sample(64, generator=gen), out_dir / "samples.png", 8)]
    x = val_data[:32].to(device)
    pairs = torch.stack([x, model.reconstruct(x)], 1).flatten(0, 1)
    paths.append(save_grid(pairs, out_dir / "reconstructions.png", 8))
    n = min(8, x.shape[0] // 2)
    steps = 10
    path = model.interpolate(x[:n], x[n:2 * n], steps=steps)  # (steps, n, C, H, W)
    paths.append(save_grid(path.transpose(0, 1).flatten(0, 1), out_dir / "interpolations.png",
                           steps))
    paths.append(save_loss_curve(history, out_dir / "loss_curve.png"))
    return paths
