"""The loss-curve PNG (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from compinv_rt.core.outputs import atomic_write_bytes


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < k or k <= 1:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    s = (c[k:] - c[:-k]) / k
    return np.concatenate([y[:k - 1].cumsum() / np.arange(1, k), s])


def loss_curve(path: str | Path, history: np.ndarray, title: str) -> Path:
    """history (S, 6): rec, anchor, l1, total, anchor distance, context regularizer per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(history) + 1)
    k = max(1, len(history) // 50)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, col, name in ((axes[0], 0, "reconstruction (masked MSE)"),
                          (axes[1], 1, "anchor (normalized)"), (axes[2], 4, "distance to anchor")):
        y = history[:, col]
        ax.plot(steps, y, alpha=0.25, lw=0.8)
        ax.plot(steps, _smooth(y, k), lw=1.5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
