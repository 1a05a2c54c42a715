"""Figures in the style of the paper: Fig. 4 (ACC per layer) and Fig. 6 (offline tuning)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from latadj_jax import schedule  # noqa: E402


def plot_profile(prof: schedule.Profile, path: Path, title: str = "") -> Path:
  """Writes the ACC points, their fit and EP per layer (paper Fig. 4) to ``path``."""
  layers = list(range(1, len(prof.acc) + 1))
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
  ax.plot(layers, prof.acc, "o", label="ACC (measured, mean over examples)")
  ax.plot(layers, prof.fit, "-", label="fitted curve F(l)")
  ax.step(layers, prof.ep, where="mid", linestyle="--", label="elimination profile EP")
  ax.set_xlabel("encoder layer l")
  ax.set_ylabel("ratio (unitless)")
  ax.set_xticks(layers)
  ax.set_ylim(0, 1.05)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title or "Attention context contribution per layer", fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_sweep(rows: Sequence[dict], metric: str, path: Path, title: str = "") -> Path:
  """Writes speedup vs k, the metric vs k, and the metric vs speedup (paper Fig. 6) to ``path``."""
  rows = sorted(rows, key=lambda r: r["coeff"])
  k = [r["coeff"] for r in rows]
  score = [100 * r[metric] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
  for key, label, style in (("expected_speedup", "expected (eq. 7)", "o-"),
                            ("flops_ratio", "XLA FLOPs ratio", "s--"),
                            ("measured_speedup", "measured latency ratio", "^-")):
    axes[0].plot(k, [r[key] for r in rows], style, label=label)
    axes[2].plot([r[key] for r in rows], score, style, label=label)
  axes[0].set(xlabel="speedup coefficient k", ylabel="speedup over k=1 (x)", title="Speedup vs k")
  axes[1].plot(k, score, "o-", color="C3")
  axes[1].set(xlabel="speedup coefficient k", ylabel=f"{metric} (%)", title=f"{metric} vs k")
  axes[2].set(xlabel="speedup over k=1 (x)", ylabel=f"{metric} (%)", title=f"{metric} vs speedup")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  axes[2].legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
