"""The report's figures beyond accuracy-vs-t: a 2-D projection of the embeddings, reconstructions from z."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def plot_embedding_2d(points: torch.Tensor, labels: torch.Tensor, path: Union[str, Path],
                      title: str = "Test embeddings (first two principal components), by class") -> None:
    """Scatter of [N, 2] points coloured by class label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), c=labels.numpy(), cmap="tab10", s=2, alpha=0.6)
    ax.legend(*sc.legend_elements(), title="class", fontsize="x-small", loc="best", markerscale=0.8)
    ax.set_title(title, fontsize="medium")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _unit(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 255.0 if image.dtype == torch.uint8 else image.float().cpu().clamp(0, 1)


def plot_reconstructions(originals: torch.Tensor, reconstructions: torch.Tensor, path: Union[str, Path],
                         t: Optional[float] = None) -> None:
    """Two rows: the images (uint8 [n, C, H, W], or float in [0, 1]) and their reconstructions x0 -> z_t ->
    sample (float [0, 1])."""
    plt = _pyplot()
    n = originals.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.6), squeeze=False)
    for i in range(n):
        for row, img in ((0, _unit(originals[i])), (1, reconstructions[i].float().cpu().clamp(0, 1))):
            ax = axes[row][i]
            ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None,
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("image", fontsize="small")
    axes[1][0].set_ylabel("from z" if t is None else f"from z, t={t:g}", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
