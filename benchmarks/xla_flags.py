"""Which XLA CPU flags make our BERT-base forward faster, measured against PyTorch in each process.

XLA flags are read once per process, so each candidate runs in its own
subprocess. Inside it, our forward (k = 1, flat profile) and HF PyTorch's
``BertModel`` (same random weights) are timed interleaved, and the ratio
ours / PyTorch is what we compare across candidates: PyTorch is the same in
every process, so the ratio cancels the machine's load drift. The candidates
themselves are run round-robin (A, B, C, A, B, C, ...) for ``--rounds``
rounds, and the median ratio per candidate is reported.

No candidate beat the noise on this CPU (see the README), so the package sets no XLA flags.

    python benchmarks/xla_flags.py                       # b8 x L128, 3 rounds (about 10 min)
    python benchmarks/xla_flags.py --shape 32x128 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from latadj_jax.runtime import workdir as wd

HERE = Path(__file__).parent
CANDIDATES = {
    "baseline": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}


def child(shape: str, seconds: float) -> None:
  """Times ours against PyTorch at one shape in this process and prints one JSON line."""
  sys.path.insert(0, str(HERE))
  import jax
  from compare_pytorch import compile_forward, inputs, torch_and_flax, torch_forward

  from latadj_jax.runtime import timing
  batch, length = (int(v) for v in shape.split("x"))
  hf, model, params = torch_and_flax(12, "float32")
  arrays = inputs(batch, length, model.vocab_size)
  exe = compile_forward(model, params, arrays, (length,) * 12)
  pytorch = torch_forward(hf, arrays)
  ours = np.asarray(exe(params, *arrays)[0])
  diff = float(np.abs(ours - pytorch().numpy()).max())
  med = timing.interleaved_medians({"ours": lambda: exe(params, *arrays), "pytorch": pytorch},
                                   repeats=3, warmup=1, min_seconds=seconds)
  print(json.dumps({"ours_ms": 1e3 * med["ours"], "pytorch_ms": 1e3 * med["pytorch"],
                    "ratio": med["ours"] / med["pytorch"], "max_abs_diff": diff,
                    "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="8x128")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--seconds", type=float, default=20.0, help="timing per candidate process")
  p.add_argument("--candidates", default=",".join(CANDIDATES))
  p.add_argument("--out", default=str(HERE / "results" / "xla_flags.json"))
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    return child(args.shape, args.seconds)
  names = args.candidates.split(",")
  runs: dict[str, list[dict]] = {n: [] for n in names}
  for r in range(args.rounds):
    for name in names:
      env = {**os.environ, "XLA_FLAGS": CANDIDATES[name], "JAX_PLATFORMS": "cpu"}
      out = subprocess.run([sys.executable, __file__, "--child", "--shape", args.shape,
                            "--seconds", str(args.seconds)], env=env, capture_output=True,
                           text=True, check=False)
      if out.returncode != 0:
        print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        runs[name].append({"error": out.stderr[-500:]})
        continue
      row = json.loads(out.stdout.strip().splitlines()[-1])
      runs[name].append(row)
      print(f"round {r + 1} {name}: ours {row['ours_ms']:.0f} ms, pytorch {row['pytorch_ms']:.0f} ms,"
            f" ratio {row['ratio']:.3f}, max |diff| {row['max_abs_diff']:.1e}", file=sys.stderr,
            flush=True)
  summary = {}
  for name, rows in runs.items():
    ok = [x for x in rows if "ratio" in x]
    if ok:
      summary[name] = {"flags": CANDIDATES[name], "median_ratio": float(np.median([x["ratio"] for x in ok])),
                       "median_ours_ms": float(np.median([x["ours_ms"] for x in ok])),
                       "max_abs_diff": max(x["max_abs_diff"] for x in ok)}
  base = summary.get("baseline", {}).get("median_ratio")
  for s in summary.values():
    s["vs_baseline"] = s["median_ratio"] / base if base else None
  result = {"benchmark": "xla_flags", "command": "python " + " ".join(sys.argv),
            "shape": args.shape, "rounds": args.rounds, "summary": summary, "runs": runs}
  wd.write_json(Path(args.out), result)
  print("| candidate | XLA_FLAGS | ours / PyTorch | vs baseline | max abs diff |\n|---|---|---|---|---|")
  for name, s in summary.items():
    vb = f"{s['vs_baseline']:.3f}" if s["vs_baseline"] else ""
    print(f"| {name} | `{s['flags']}` | {s['median_ratio']:.3f} | {vb} | {s['max_abs_diff']:.1e} |")


if __name__ == "__main__":
  main()
