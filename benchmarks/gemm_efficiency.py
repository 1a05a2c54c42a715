"""How fast one BERT-base MLP runs per FLOP as the token count shrinks, and what that caps.

Elimination shrinks the token count M of each later layer, so at batch 1 the
late layers multiply a few dozen rows by the same 768 x 3072 weights. If those
small products run at a lower FLOP rate than the full-length ones, the
measured speedup falls below the FLOPs ratio however the attention is
written. This times the MLP (dense, exact GELU, dense: 9.4 MB of float32
weights, parameters on the device):

1. **XLA alone**, at every token count that BERT-base's flat schedules at
   ``--lengths`` and ``--ks`` give the MLP (N_1 … N_12), all in one
   interleaved loop. From it, each schedule's **MLP measured / FLOPs**:
   (12 x t(N_0) / sum_l t(N_l)) / (12 N_0 / sum_l N_l), the share of the FLOPs
   ratio the MLP alone can turn into time.
2. **XLA against PyTorch** (``F.linear``, 2 threads, ``OMP_WAIT_POLICY=PASSIVE``
   so libgomp's workers do not spin into our turn), each token count of
   ``--torch_tokens`` in its own interleaved pair.

and a NumPy sum over 256 MB for the rate memory is read at (one thread): the
time to read the weights once bounds the MLP from below at small M.

    python benchmarks/gemm_efficiency.py
    python benchmarks/gemm_efficiency.py --lengths 512 --ks 0.8 --seconds 1   # a quick look
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from latadj_jax.core import schedule
from latadj_jax.runtime import timing

D, F, LAYERS = 768, 3072, 12


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", default="256,512", help="bucket lengths N_0 of the schedules")
  p.add_argument("--ks", default="0.9,0.8", help="flat-profile k of the schedules")
  p.add_argument("--torch_tokens", default="1,16,53,134,512", help="token counts of the PyTorch pairs")
  p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (at least)")
  p.add_argument("--seconds", type=float, default=3.0, help="sampling time of each PyTorch pair")
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gemm_efficiency.json"))
  return p.parse_args(argv)


def mlp(p, x):
  return jax.nn.gelu(x @ p["w1"] + p["b1"], approximate=False) @ p["w2"] + p["b2"]


def read_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
  """Returns the read bandwidth of a NumPy sum over a large array (one thread), GB/s."""
  a = np.ones(mb * 2**18, np.float32)
  best = min(_timed(a.sum) for _ in range(repeats))
  return a.nbytes / best / 1e9


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def schedule_rows(lengths, ks, ms: dict[int, float]) -> list[dict]:
  """Returns, per (N_0, k), the MLP's measured speedup over its FLOPs ratio from the times ``ms``."""
  rows = []
  for n in lengths:
    for k in ks:
      counts = schedule.keep_counts(n, k, schedule.flat_profile(LAYERS))
      flops_ratio = LAYERS * n / sum(counts)
      measured = LAYERS * ms[n] / sum(ms[m] for m in counts)
      rows.append({"seq_len": n, "k": k, "keep_counts": list(counts), "mlp_flops_ratio": flops_ratio,
                   "mlp_measured_speedup": measured, "mlp_measured_over_flops": measured / flops_ratio})
  return rows


def main(argv=None) -> dict:
  args = parse_args(argv)
  lengths = [int(t) for t in args.lengths.split(",")]
  ks = [schedule.validate_coeff(t) for t in args.ks.split(",")]
  rng = np.random.default_rng(0)
  host = {"w1": rng.normal(0, .02, (D, F)), "b1": rng.normal(0, .02, F),
          "w2": rng.normal(0, .02, (F, D)), "b2": rng.normal(0, .02, D)}
  host = {k: v.astype(np.float32) for k, v in host.items()}
  params, fwd = jax.device_put(host), jax.jit(mlp)
  bandwidth = read_bandwidth_gbs()
  weight_read_ms = 1e3 * 4 * 2 * D * F / (bandwidth * 1e9)

  tokens = sorted({m for n in lengths for k in ks
                   for m in (n, *schedule.keep_counts(n, k, schedule.flat_profile(LAYERS)))})
  xs = {m: jax.device_put(rng.normal(size=(m, D)).astype(np.float32)) for m in tokens}
  print(f"XLA alone at {len(tokens)} token counts ...", file=sys.stderr)
  med = timing.interleaved_medians({m: (lambda x=xs[m]: fwd(params, x)) for m in tokens},
                                   repeats=args.rounds, warmup=2)
  ms = {m: 1e3 * s for m, s in med.items()}
  peak = max(4 * m * D * F / (t / 1e3) / 1e9 for m, t in ms.items())
  alone = [{"tokens": m, "ms": ms[m], "gflops": 4 * m * D * F / (ms[m] / 1e3) / 1e9} for m in tokens]
  for r in alone:
    print(f"M={r['tokens']:4d}: {r['ms']:6.2f} ms  {r['gflops']:4.0f} GF/s "
          f"({r['gflops'] / peak:.2f} of the best)", file=sys.stderr)
  sched = schedule_rows(lengths, ks, ms)
  for r in sched:
    print(f"N_0={r['seq_len']} k={r['k']}: MLP FLOPs ratio {r['mlp_flops_ratio']:.2f}x, measured "
          f"{r['mlp_measured_speedup']:.2f}x -> {r['mlp_measured_over_flops']:.2f}", file=sys.stderr)

  import torch
  import torch.nn.functional as tF
  torch.set_num_threads(2)
  tp = {k: torch.from_numpy(v) for k, v in host.items()}
  pairs = []
  for m in [int(t) for t in args.torch_tokens.split(",")]:
    xh = rng.normal(size=(m, D)).astype(np.float32)
    x, xt = jax.device_put(xh), torch.from_numpy(xh)

    def torch_mlp():
      with torch.no_grad():
        return tF.linear(tF.gelu(tF.linear(xt, tp["w1"].T, tp["b1"])), tp["w2"].T, tp["b2"])

    np.testing.assert_allclose(torch_mlp().numpy(), np.asarray(fwd(params, x)), atol=1e-4)
    pair = timing.interleaved_medians({"xla": lambda: fwd(params, x), "torch": torch_mlp},
                                      repeats=10, warmup=3, min_seconds=args.seconds)
    pairs.append({"tokens": m, "xla_ms": 1e3 * pair["xla"], "torch_ms": 1e3 * pair["torch"],
                  "xla_over_torch": pair["xla"] / pair["torch"]})
    print(f"M={m:4d}: XLA {pairs[-1]['xla_ms']:.2f} ms, PyTorch {pairs[-1]['torch_ms']:.2f} ms",
          file=sys.stderr)

  result = {"benchmark": "gemm_efficiency", "command": "python benchmarks/gemm_efficiency.py " +
            " ".join(argv if argv is not None else sys.argv[1:]),
            "device": timing.device_name(), "jax_version": jax.__version__,
            "torch_version": torch.__version__, "mlp": f"{D}x{F} dense, exact GELU, {F}x{D} dense",
            "read_bandwidth_gbs": bandwidth, "weight_read_ms": weight_read_ms,
            "xla_alone": alone, "schedules": sched, "pytorch_pairs": pairs}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=1))
  print(f"wrote {args.out}", file=sys.stderr)
  return result


if __name__ == "__main__":
  main()
