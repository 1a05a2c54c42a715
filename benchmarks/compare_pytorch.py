"""Our Flax BERT-base against HF PyTorch ``BertModel`` at equal work, then with elimination.

Both models hold the same random BERT-base weights (HF's init, seed 0, copied
into ours) and run in one process on the same inputs (every token valid):
warm, runs interleaved round-robin, median of the rounds (see
``latadj_jax.runtime.timing.interleaved_medians``). PyTorch runs eager under
``torch.inference_mode()`` with its default attention (SDPA) and thread count;
both produce the last hidden state and the pooler output.

Table 1 is equal work: our model at ``k = 1`` with the flat profile (no
elimination). Table 2 is our model with elimination at each ``k`` against
PyTorch's full model. Its profile is the one ``train.py --config=quickstart``
fits on the 6-layer MiniLM, EP = [0.739, 0.792, 0.832, 0.911, 1, 1], spread
over 12 layers so that the share of word-vectors left at each relative depth
is unchanged: each value becomes two layers of ``sqrt(EP)``.

The machine load average is recorded for each shape: the 2-core CPU this was
written on is shared, and contention slows both frameworks, not always alike.

    python benchmarks/compare_pytorch.py                 # all 9 shapes (about 25 min on 2 cores)
    python benchmarks/compare_pytorch.py --quick         # 4 small shapes, few rounds (~3 min)
    python benchmarks/compare_pytorch.py --shapes 8x128,32x128 --ks 0.9
    python benchmarks/compare_pytorch.py --ort           # + ONNX Runtime pairs (pip install -e '.[bench]')
    python benchmarks/compare_pytorch.py --dtype bfloat16   # ours bf16 against PyTorch bf16 autocast
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.runtime import timing
from latadj_jax.runtime import workdir as wd

QUICKSTART_EP = (0.739, 0.792, 0.832, 0.911, 1.0, 1.0)  # README quickstart, 6-layer MiniLM


def spread_profile(ep: tuple[float, ...], num_layers: int) -> tuple[float, ...]:
  """Returns ``ep`` spread over ``num_layers`` layers with the same keep share at each relative depth.

  Each of the ``len(ep)`` values covers ``r = num_layers / len(ep)`` layers as
  ``EP ** (1 / r)``, so the product over those layers is the original value.
  """
  r = num_layers / len(ep)
  if r != int(r):
    raise ValueError(f"cannot spread a {len(ep)}-layer profile over {num_layers} layers")
  return tuple(float(e ** (1 / r)) for e in ep for _ in range(int(r)))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--lengths", default="64,128,512")
  p.add_argument("--shapes", default="", help="BxN list such as 8x128,32x128 (overrides the grid)")
  p.add_argument("--ks", default="0.95,0.9,0.85,0.8", help="k values for the elimination table")
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="our activations and parameters; with bfloat16, PyTorch runs under "
                      "torch.autocast(bfloat16)")
  p.add_argument("--ort", action="store_true",
                 help="also time ONNX Runtime (the HF model exported to ONNX, 2 threads, no "
                      "spinning) against our k = 1, in its own interleaved pair")
  p.add_argument("--min_rounds", type=int, default=3, help="timed rounds per shape, at least")
  p.add_argument("--seconds", type=float, default=60.0,
                 help="keep adding rounds until a shape has been timed this long")
  p.add_argument("--quick", action="store_true",
                 help="batches 1,8 and lengths 64,128, 2 ks, 3 rounds, 10 s per shape")
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "compare_pytorch.json"))
  args = p.parse_args(argv)
  if args.quick:
    args.batches, args.lengths, args.ks, args.seconds = "1,8", "64,128", "0.9,0.8", 10.0
  return args


def shape_list(args: argparse.Namespace) -> list[tuple[int, int]]:
  """Returns the (batch, length) pairs to run, smallest work first."""
  if args.shapes:
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
  else:
    shapes = [(b, n) for b in map(int, args.batches.split(",")) for n in map(int, args.lengths.split(","))]
  return sorted(shapes, key=lambda bn: (bn[0] * bn[1], bn[1]))


def torch_and_flax(layers: int, dtype: str):
  """Returns ``(hf_model, model, params)``: HF BERT-base with random weights, ours holding them."""
  import torch
  import transformers
  torch.manual_seed(0)
  hf = transformers.BertModel(transformers.BertConfig(num_hidden_layers=layers)).eval()
  model = models.build(hf.config.to_dict(), "none", dtype=dtype, param_dtype=dtype)
  tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
  params, report = models.load_tensors(model.abstract_params(), model.family, tensors, "torch")
  if report.missing:
    raise RuntimeError(f"weights not copied: {report.missing}")
  return hf, model, jax.tree.map(jnp.asarray, params)


def inputs(batch: int, length: int, vocab: int, seed: int = 0):
  """Returns (ids, mask, token types) as int32 NumPy arrays: random tokens, every one valid."""
  ids = np.random.default_rng(seed).integers(5, vocab, (batch, length)).astype(np.int32)
  return ids, np.ones_like(ids), np.zeros_like(ids)


def compile_forward(model, params, arrays, counts):
  """Returns our compiled forward (last hidden state and pooler output) for one schedule."""
  def forward(p, ids, mask, types):
    out = model.apply(p, models.Batch(ids, mask, types), counts)
    return out.last_hidden_state, out.pooled
  return jax.jit(forward).lower(params, *arrays).compile()


def torch_forward(hf, arrays, dtype: str = "float32"):
  """Returns a zero-argument function: HF PyTorch's last hidden state for the NumPy ``arrays``.

  With ``dtype`` bfloat16 it runs under ``torch.autocast("cpu", torch.bfloat16)``.
  """
  import contextlib

  import torch
  ids, mask, types = (torch.tensor(a, dtype=torch.long) for a in arrays)
  autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else \
      contextlib.nullcontext

  def forward():
    with torch.inference_mode(), autocast():
      return hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
  return forward


def ort_session(hf, directory: Path, threads: int = 2):
  """Returns an ONNX Runtime session of ``hf`` (exported once to ``directory``), spinning off.

  ORT's worker threads spin between ops by default, which slows whatever runs
  next on a 2-core machine (PyTorch at 8x128 went from 1,019 to 1,369 ms with
  ORT in the same loop), so ``session.intra_op.allow_spinning`` is 0.
  """
  try:
    import onnx  # noqa: F401  (torch.onnx.export needs it)
    import onnxruntime as ort
  except ImportError as e:
    raise SystemExit(f"--ort needs ONNX Runtime: pip install -e '.[bench]' ({e})") from e
  import torch
  path = directory / "bert.onnx"
  if not path.exists():
    ids = torch.ones((1, 8), dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "length"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "length"}
    class Positional(torch.nn.Module):  # the exporter passes inputs by position
      def __init__(self):
        super().__init__()
        self.hf = hf

      def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids)
        return out.last_hidden_state, out.pooler_output

    with torch.inference_mode():
      torch.onnx.export(Positional(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path),
                        input_names=names, output_names=["last_hidden_state", "pooler_output"],
                        dynamic_axes=axes, opset_version=17, dynamo=False)
    hf.eval()  # the exporter can leave the module in training mode (dropout on)
  opts = ort.SessionOptions()
  opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
  opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
  opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
  opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_forward(session, arrays):
  """Returns a zero-argument function: ONNX Runtime's last hidden state for the NumPy ``arrays``."""
  feed = {"input_ids": arrays[0].astype(np.int64), "attention_mask": arrays[1].astype(np.int64),
          "token_type_ids": arrays[2].astype(np.int64)}
  return lambda: session.run(["last_hidden_state"], feed)[0]


def run_shape(args, hf, model, params, batch: int, length: int, ks, profile,
              session=None) -> dict:
  """Returns one result row: PyTorch and our latencies at every k for one (batch, length).

  With an ONNX Runtime ``session``, ORT and our k = 1 are timed again in a pair
  of their own, after the PyTorch group.
  """
  arrays = inputs(batch, length, model.vocab_size)
  L = model.num_layers
  pytorch = torch_forward(hf, arrays, args.dtype)

  schedules = {"k=1 flat": (length,) * L}
  schedules.update({f"k={k}": schedule.keep_counts(length, k, profile) for k in ks})
  fns, compiled, compile_s = {"pytorch": pytorch}, {}, {}
  for name, counts in schedules.items():
    t0 = time.perf_counter()
    compiled[name] = compile_forward(model, params, arrays, counts)
    compile_s[name] = time.perf_counter() - t0
    fns[name] = lambda c=compiled[name]: c(params, *arrays)
  ours = np.asarray(compiled["k=1 flat"](params, *arrays)[0], np.float32)
  parity = float(np.abs(ours - pytorch().numpy()).max())

  load_before = os.getloadavg()[0]
  t0 = time.perf_counter()
  med = timing.interleaved_medians(fns, repeats=args.min_rounds, warmup=1,
                                   min_seconds=args.seconds)
  wall = time.perf_counter() - t0
  flops = {name: timing.compiled_flops(c) for name, c in compiled.items()}
  base = "k=1 flat"
  elim = []
  for k in ks:
    name = f"k={k}"
    elim.append({"k": k, "keep_counts": list(schedules[name]), "ms": 1e3 * med[name],
                 "vs_pytorch": med[name] / med["pytorch"],
                 "speedup_vs_pytorch": med["pytorch"] / med[name],
                 "speedup_vs_ours_k1": med[base] / med[name],
                 "expected_speedup": schedule.expected_speedup(length, schedules[name]),
                 "flops_speedup": flops[base] / flops[name], "compile_s": compile_s[name]})
  row = {"batch": batch, "length": length, "pytorch_ms": 1e3 * med["pytorch"],
         "ours_ms": 1e3 * med[base], "ratio": med[base] / med["pytorch"],
         "max_abs_diff_vs_pytorch": parity, "xla_flops": flops[base],
         "timed_seconds": wall, "load_avg_1min": [load_before, os.getloadavg()[0]],
         "elimination": elim}
  if session is not None:
    onnx = ort_forward(session, arrays)
    row["ort_max_abs_diff_vs_pytorch"] = float(np.abs(onnx() - pytorch().float().numpy()).max())
    pair = timing.interleaved_medians({"ort": onnx, base: fns[base]}, repeats=args.min_rounds,
                                      warmup=1, min_seconds=args.seconds)
    row.update(ort_ms=1e3 * pair["ort"], ours_ms_ort_pair=1e3 * pair[base],
               ratio_vs_ort=pair[base] / pair["ort"])
  print(f"{batch}x{length}: pytorch {row['pytorch_ms']:.0f} ms, ours {row['ours_ms']:.0f} ms "
        f"({row['ratio']:.2f}x), " + ", ".join(f"k={e['k']} {e['ms']:.0f} ms" for e in elim)
        + (f"; ORT {row['ort_ms']:.0f} ms, ours {row['ours_ms_ort_pair']:.0f} ms "
           f"({row['ratio_vs_ort']:.2f}x)" if session is not None else "")
        + f"; load {load_before:.1f}", file=sys.stderr, flush=True)
  return row


def run(args: argparse.Namespace) -> dict:
  """Returns the results dict: settings, device and one row per shape."""
  import torch
  import transformers
  ks = [float(k) for k in args.ks.split(",")] if args.ks else []
  hf, model, params = torch_and_flax(args.layers, args.dtype)
  profile = spread_profile(QUICKSTART_EP, args.layers) if args.layers % 6 == 0 else \
      schedule.flat_profile(args.layers)
  session = None
  if args.ort:
    import tempfile
    tmp = tempfile.TemporaryDirectory()
    session = ort_session(hf, Path(tmp.name))
  rows = [run_shape(args, hf, model, params, b, n, ks, profile, session)
          for b, n in shape_list(args)]
  return {
      "benchmark": "compare_pytorch",
      "command": "python " + " ".join(sys.argv),
      "device": timing.device_name(),
      "versions": {"jax": jax.__version__, "torch": torch.__version__,
                   "transformers": transformers.__version__},
      "settings": {"model": "BERT-base shape (BertModel with pooler), random weights (HF init, "
                            "seed 0) shared by both", "layers": args.layers,
                   "dtype_ours": args.dtype,
                   "dtype_pytorch": "autocast bfloat16" if args.dtype == "bfloat16" else "float32",
                   "ort": (f"onnxruntime {__import__('onnxruntime').__version__}, the HF model "
                           "exported with torch.onnx (opset 17), ORT_ENABLE_ALL, 2 intra-op "
                           "threads, spinning off; timed against our k = 1 in its own pair"
                           if args.ort else None),
                   "pytorch": f"eager, inference_mode, attn {hf.config._attn_implementation}, "
                              f"{torch.get_num_threads()} threads",
                   "inputs": "random token ids, every position valid",
                   "profile": [round(e, 4) for e in profile],
                   "profile_source": "quickstart EP [0.739, 0.792, 0.832, 0.911, 1, 1] "
                                     "spread to 12 layers as two layers of sqrt(EP) each",
                   "timing": f"median of interleaved rounds: at least {args.min_rounds} rounds "
                             f"and {args.seconds:.0f} s per shape, after one warm-up round"},
      "rows": rows,
  }


def markdown(result: dict) -> str:
  """Returns both results tables in Markdown."""
  rows = result["rows"]
  lines = [f"BERT-base (random weights), ours at k = 1 (flat profile: no elimination) against "
           f"HF PyTorch BertModel, {result['device']}, {result['settings']['dtype_ours']}. "
           f"Ratio below 1: we are faster.", "",
           "| batch | length | PyTorch ms | ours ms | ours / PyTorch | load avg |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['batch']} | {r['length']} | {r['pytorch_ms']:.0f} | {r['ours_ms']:.0f} | "
                 f"{r['ratio']:.2f}x | {r['load_avg_1min'][0]:.1f} |")
  if rows and "ort_ms" in rows[0]:
    lines += ["", "ONNX Runtime against ours at k = 1, each pair timed on its own.", "",
              "| batch | length | ORT ms | ours ms | ours / ORT |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['length']} | {r['ort_ms']:.0f} | {r['ours_ms_ort_pair']:.0f} "
              f"| {r['ratio_vs_ort']:.2f}x |" for r in rows]
  ks = [e["k"] for e in rows[0]["elimination"]] if rows else []
  if ks:
    lines += ["", "Ours with elimination (profile: quickstart EP spread to 12 layers) against "
              "PyTorch's full model: speedup over PyTorch (our k = 1 speedup in brackets).", "",
              "| batch | length | " + " | ".join(f"k = {k}" for k in ks) + " |",
              "|---|---|" + "---|" * len(ks)]
    for r in rows:
      cells = [f"{e['speedup_vs_pytorch']:.2f}x ({e['speedup_vs_ours_k1']:.2f}x)"
               for e in r["elimination"]]
      lines.append(f"| {r['batch']} | {r['length']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  result = run(args)
  out = Path(args.out)
  wd.write_json(out, result)
  print(markdown(result))
  print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
