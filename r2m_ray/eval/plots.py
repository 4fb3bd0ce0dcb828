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


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write a figure as PNG (creating its folder) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    return save_figure(fig, path)


def plot_curve(xs: list[float], series: dict[str, list[float]], path: Path, title: str, xlabel: str) -> Path:
    """A simple line plot of several named series."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, ys in series.items():
        ax.plot(xs, ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def plot_best_of_n(curves: dict[str, Any], path: Path) -> Path:
    """Best-of-n: each reward against the KL bound (n marked on the points), and length against n."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    kl = curves["kl_bound"]
    for name in ("proxy", "judge", "gold"):
        if curves.get(name):
            axes[0].plot(kl, curves[name], marker="o", label=name)
    for n, x, y in zip(curves["n"], kl, curves["proxy"]):
        axes[0].annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    axes[0].set_xlabel("KL bound log n − (n−1)/n (nats)")
    axes[0].set_title("reward of the best of n")
    axes[0].legend()
    axes[1].plot(curves["n"], curves["length"], marker="o")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("n")
    axes[1].set_title("response tokens of the best of n")
    return save_figure(fig, path)
