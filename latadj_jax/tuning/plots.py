"""Figures in the style of the paper: Fig. 3 (score vectors), Fig. 4 (ACC per layer), Fig. 6 (offline tuning)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from latadj_jax.core import schedule  # noqa: E402


def plot_profile(prof: schedule.Profile, path: Path, title: str = "",
                 xlabel: str = "encoder layer l") -> Path:
  """Writes the ACC points, their fit and EP per layer (paper Fig. 4) to ``path``."""
  layers = list(range(1, len(prof.acc) + 1))
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
  ax.plot(layers, prof.acc, "o", label="ACC (measured, mean over examples)")
  ax.plot(layers, prof.fit, "-", label="fitted curve F(l)")
  ax.step(layers, prof.ep, where="mid", linestyle="--", label="elimination profile EP")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("ratio (unitless)")
  ax.set_xticks(layers if len(layers) <= 16 else layers[::3])  # 30 labels would collide
  ax.set_ylim(0, 1.05)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(textwrap.fill(title or "Attention context contribution per layer", 60), fontsize=10)
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


def plot_scores(tokens: Sequence[str], scores: dict[int, Sequence[float]], path: Path,
                title: str = "") -> Path:
  """Writes one input's score vector SV per token at a few layers (paper Fig. 3) to ``path``.

  ``scores`` maps a 1-based layer number to that layer's SV over the input's
  valid tokens. Each layer gets a bar panel with its mean and median marked
  (ACC = median / mean); a last panel overlays the sorted scores, which shows
  the late layers concentrating their attention on a few word-vectors.
  """
  layers = sorted(scores)
  n = len(tokens)
  fig = plt.figure(figsize=(max(9.0, 0.22 * n + 5.0), 2.6 * len(layers) + 0.6), dpi=110)
  grid = fig.add_gridspec(len(layers), 2, width_ratios=(3, 1.2))
  first = None
  for row, layer in enumerate(layers):
    sv = np.asarray(scores[layer], dtype=np.float64)
    ax = fig.add_subplot(grid[row, 0], sharey=first)  # one y scale: layers compare by eye
    first = first or ax
    mean, median = sv.mean(), float(np.median(sv))
    ax.bar(range(n), sv, color=f"C{row}", width=0.8)
    ax.axhline(mean, color="k", lw=1, label=f"mean = {mean:.2f}")
    ax.axhline(median, color="k", lw=1, ls="--", label=f"median = {median:.2f}")
    ax.set_ylabel("score SV_j (unitless)")
    ax.set_title(f"layer {layer}: ACC = median / mean = {median / mean:.2f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_xticks(range(n))
    ax.set_xticklabels(tokens, rotation=90, fontsize=7)
  ax.set_xlabel("input token (word-vector j, in input order)")
  ax = fig.add_subplot(grid[:, 1])
  for row, layer in enumerate(layers):
    sv = np.sort(np.asarray(scores[layer], dtype=np.float64))[::-1]
    ax.plot(range(1, n + 1), sv / sv.mean(), "o-", ms=3, color=f"C{row}", label=f"layer {layer}")
  ax.axhline(1.0, color="k", lw=1)
  ax.set_xlabel("rank of word-vector (1 = highest score)")
  ax.set_ylabel("score / mean score (unitless)")
  ax.set_title("Sorted scores", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.suptitle(title or "Score vector of one input (paper Fig. 3)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
