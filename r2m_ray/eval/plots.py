"""Plots written into a run's plots/ folder (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _smooth(values: list[float], k: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_rm_training(history: list[dict[str, Any]], path: Path) -> Path:
    """Loss and batch accuracy against step (moving average over 10 steps)."""
    steps = list(range(1, len(history) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in ("loss", "reward_loss", "reg_loss"):
        if history and key in history[0]:
            axes[0].plot(steps, _smooth([h[key] for h in history]), label=key)
    axes[0].set_xlabel("step")
    axes[0].set_title("RM loss")
    axes[0].legend()
    axes[1].plot(steps, _smooth([h["accuracy"] for h in history]))
    axes[1].set_xlabel("step")
    axes[1].set_title("train batch accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curve(xs: list[float], series: dict[str, list[float]], path: Path, title: str, xlabel: str) -> Path:
    """A simple line plot of several named series."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, ys in series.items():
        ax.plot(xs, ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
