"""Over-optimisation statistics of RL runs, and their comparison over paired seeds.

Per run (one arm, one seed), from its logged steps, on curves smoothed by a centred moving
average of `window` steps (per-step values average only 64 samples):
- peak gold: the smoothed gold curve's maximum; its step; the smoothed sequence KL there;
- rise / fall: peak − smoothed gold at the first / last step (both > 0: a peak inside the run);
- gold at fixed KL budgets: the smoothed gold interpolated at √KL = √b on the running maximum of
  the smoothed √KL (NaN when the run never reached b);
- proxy–gold area: mean over steps of |z(proxy) − z(gold)|, each smoothed curve z-normalised
  over the run (0 = the two move together; it grows as they part), for the optimised reward
  and for the frozen RM's reward;
- late gold: the mean raw gold of the last `window` steps; the final policy's win rate.
Across seeds: mean and the 95% t-interval; for each arm, the paired difference to a reference
arm with its 95% t-interval and the smallest difference the seeds could detect (two-sided
α = 0.05, power 0.8: (t₀.₉₇₅ + t₀.₈)·sd(diff)/√n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

WINDOW = 15


def smooth(values: Sequence[float], window: int = WINDOW) -> np.ndarray:
    """Centred moving average; the window shrinks at the ends (no padding values invented)."""
    x = np.asarray(values, dtype=float)
    half = window // 2
    csum = np.concatenate([[0.0], np.cumsum(x)])
    lo = np.clip(np.arange(len(x)) - half, 0, len(x))
    hi = np.clip(np.arange(len(x)) + half + 1, 0, len(x))
    return (csum[hi] - csum[lo]) / (hi - lo)


def _z(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def curve_stats(history: list[dict[str, Any]], kl_budgets: Sequence[float], window: int = WINDOW) -> dict[str, Any]:
    """The over-optimisation statistics of one run's logged RL steps (see the module docstring)."""
    rows = [h for h in history if h.get("gold_reward") is not None]
    if len(rows) < 2:
        raise ValueError(f"curve_stats needs at least 2 logged steps with a gold reward, got {len(rows)}")
    steps = np.array([h["step"] for h in rows])
    gold = smooth([h["gold_reward"] for h in rows], window)
    kl = smooth([max(h["kl_seq"], 0.0) for h in rows], window)
    sqrt_kl = np.maximum.accumulate(np.sqrt(kl))  # monotone, so gold can be read off it
    peak = int(np.argmax(gold))
    out: dict[str, Any] = {
        "peak_gold": float(gold[peak]),
        "peak_step": int(steps[peak]),
        "kl_at_peak": float(kl[peak]),
        "rise": float(gold[peak] - gold[0]),
        "fall": float(gold[peak] - gold[-1]),
        "late_gold": float(np.mean([h["gold_reward"] for h in rows[-window:]])),
        "final_kl": float(kl[-1]),
    }
    for b in kl_budgets:
        root = math.sqrt(b)
        out[f"gold_at_kl_{b:g}"] = float(np.interp(root, sqrt_kl, gold)) if root <= sqrt_kl[-1] else math.nan
    for name, key in (("proxy", "proxy_reward"), ("frozen_rm", "frozen_rm_reward")):
        other = smooth([h[key] for h in rows], window)
        out[f"area_{name}_gold"] = float(np.mean(np.abs(_z(other) - _z(gold))))
    return out


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the t-interval, n) over the finite values; half-width NaN for n < 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, 0
    if len(x) < 2:
        return float(x.mean()), math.nan, 1
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half), len(x)


def paired_difference(a: Sequence[float], b: Sequence[float], power: float = 0.8) -> dict[str, float]:
    """a − b over seeds present (finite) in both: mean, 95% half-width, detectable effect, n."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    diff = np.array([x - y for x, y in pairs], dtype=float)
    mean, half, n = mean_ci(diff)
    mde = math.nan
    if n >= 2:
        mde = float((stats.t.ppf(0.975, n - 1) + stats.t.ppf(power, n - 1)) * diff.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "half_width": half, "detectable": mde, "n": n}


def paired_cell(diff: dict[str, float], digits: int) -> str:
    """A `paired_difference` as a table cell: mean ± 95% half-width (detectable effect)."""
    d = digits
    return f"{diff['mean']:+.{d}f} ± {diff['half_width']:.{d}f} ({diff['detectable']:.{d}f})"


def band_on_grid(curves: list[tuple[np.ndarray, np.ndarray]], points: int = 40) -> tuple[np.ndarray, ...]:
    """Per-seed (x, y) curves → (grid, mean, sd) on a shared x grid up to the smallest max x (every seed
    contributes at every grid point)."""
    top = min(float(x[-1]) for x, _ in curves)
    grid = np.linspace(0.0, top, points)
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(0), ys.std(0)


def kl_curves(history: list[dict[str, Any]], key: str, window: int = WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """(running-max √ smoothed sequence KL, smoothed `key`) of one run, for plotting against √KL."""
    rows = [h for h in history if h.get(key) is not None]
    kl = smooth([max(h["kl_seq"], 0.0) for h in rows], window)
    return np.maximum.accumulate(np.sqrt(kl)), smooth([h[key] for h in rows], window)
