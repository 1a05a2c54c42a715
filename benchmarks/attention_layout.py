"""Where our BERT loses time to PyTorch's: the attention core in two layouts, and the elementwise ops.

Times q.k, softmax and probs.v for BERT-base heads (12 x 64) in one process,
interleaved, median of rounds:

* ``einsum``: ``einsum("bqhd,bkhd->bhqk")`` / ``einsum("bhqk,bkhd->bqhd")``, the
  form HF's Flax models use (head axis in the middle);
* ``head_major``: ``latadj_jax.models.attention`` (transpose to [B, H, N, K],
  then batched matmuls), what our models now use;
* ``torch_manual``: the same three steps in PyTorch (what HF's eager path does);
* ``torch_sdpa``: PyTorch's fused ``scaled_dot_product_attention`` (HF's default).

Then, at the same shapes, the elementwise ops of a BERT layer in XLA and in
PyTorch: exact (erf) GELU on [B, N, 3072], LayerNorm on [B, N, 768], softmax
on [B, 12, N, N].

    python benchmarks/attention_layout.py        # about 2 minutes
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from latadj_jax.models import attention
from latadj_jax.runtime import timing
from latadj_jax.runtime import workdir as wd

H, K = 12, 64
SHAPES = ((1, 128), (8, 128), (32, 128), (8, 512))


def einsum_core(q, k, v):
  probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 8.0, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def head_major_core(q, k, v):
  return attention.context(jax.nn.softmax(attention.logits(q, k) / 8.0, axis=-1), v)


def elementwise(b: int, n: int) -> dict:
  """Returns median ms of GELU, LayerNorm and softmax at one shape, XLA and PyTorch interleaved."""
  rng = np.random.default_rng(0)
  f, h, l = (rng.standard_normal(s).astype(np.float32) for s in ((b, n, 3072), (b, n, 768), (b, H, n, n)))
  jf, jh, jl = map(jnp.asarray, (f, h, l))
  tf, th, tl = map(torch.tensor, (f, h, l))
  gelu = jax.jit(lambda x: jax.nn.gelu(x, approximate=False))
  ln = jax.jit(lambda x: (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-12))
  sm = jax.jit(lambda x: jax.nn.softmax(x, axis=-1))
  F = torch.nn.functional
  fns = {"gelu_xla": lambda: gelu(jf), "gelu_torch": lambda: F.gelu(tf),
         "layernorm_xla": lambda: ln(jh), "layernorm_torch": lambda: F.layer_norm(th, (768,)),
         "softmax_xla": lambda: sm(jl), "softmax_torch": lambda: F.softmax(tl, -1)}
  with torch.inference_mode():
    med = timing.interleaved_medians(fns, repeats=20, warmup=2, min_seconds=5)
  return {k: 1e3 * v for k, v in med.items()}


def main() -> None:
  rows = []
  for b, n in SHAPES:
    x = np.random.default_rng(0).standard_normal((b, n, H, K)).astype(np.float32)
    jx, tx = jnp.asarray(x), torch.tensor(x).transpose(1, 2).contiguous()
    ein, hm = jax.jit(einsum_core), jax.jit(head_major_core)
    diff = float(np.abs(np.asarray(ein(jx, jx, jx)) - np.asarray(hm(jx, jx, jx))).max())
    fns = {"einsum": lambda: ein(jx, jx, jx), "head_major": lambda: hm(jx, jx, jx),
           "torch_manual": lambda: torch.softmax(tx @ tx.transpose(-1, -2) / 8.0, -1) @ tx,
           "torch_sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(tx, tx, tx)}
    with torch.inference_mode():
      med = timing.interleaved_medians(fns, repeats=20, warmup=2, min_seconds=10)
    row = {"batch": b, "length": n, "max_abs_diff": diff, **{f"{k}_ms": 1e3 * v for k, v in med.items()}}
    row["elementwise_ms"] = elementwise(b, n)
    rows.append(row)
    print(f"{b}x{n}: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in med.items()), file=sys.stderr)
  out = Path(__file__).parent / "results" / "attention_layout.json"
  wd.write_json(out, {"benchmark": "attention_layout", "command": "python " + " ".join(sys.argv),
                      "device": timing.device_name(), "heads": H, "head_dim": K, "rows": rows})
  print("| batch | length | einsum ms | head-major ms | PyTorch manual ms | PyTorch SDPA ms |\n"
        "|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['length']} | {r['einsum_ms']:.1f} | {r['head_major_ms']:.1f} | "
          f"{r['torch_manual_ms']:.1f} | {r['torch_sdpa_ms']:.1f} |")
  print("\n| batch | length | GELU XLA / PyTorch ms | LayerNorm XLA / PyTorch ms | softmax XLA / PyTorch ms |\n"
        "|---|---|---|---|---|")
  for r in rows:
    e = r["elementwise_ms"]
    print(f"| {r['batch']} | {r['length']} | " + " | ".join(
        f"{e[op + '_xla']:.1f} / {e[op + '_torch']:.1f}" for op in ("gelu", "layernorm", "softmax")) + " |")


if __name__ == "__main__":
  main()
