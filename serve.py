"""Serve a trained classifier over HTTP, choosing k per batch to hold a latency SLO.

    python serve.py --workdir=DIR --slo_ms=100 --port=8000
    python serve.py --workdir=DIR --slo_ms=100 --k_min=0.6 --k_max=1.0   # the range k moves in
    python serve.py --workdir=DIR --fixed_k=1.0                          # no adaptation
    curl -s localhost:8000/v1/classify -d '{"texts": ["a gripping film", "dull"]}'

k moves between --k_min and --k_max (default: k = 1 down to the lowest k of the
workdir's eval sweep within --max_drop points of k = 1). Every (length bucket,
batch size, k) executable compiles before /readyz turns 200; the executables
(WORKDIR/serve_executables) and the latency table
(WORKDIR/serve_latency_<device>.json) are kept, so a second start is quick.
This file is intentionally short: the server lives in ``latadj_jax.serving``.
"""

import argparse
import os
from pathlib import Path

from latadj_jax.runtime import cli


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a classifier trained with train.py")
  p.add_argument("--slo_ms", type=float, default=100.0, help="per-request latency target (p99)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--k_min", type=float, default=None, help="lowest k served (default: from the sweep)")
  p.add_argument("--k_max", type=float, default=1.0, help="highest k served")
  p.add_argument("--k_points", type=int, default=5, help="k values compiled between k_min and k_max")
  p.add_argument("--max_drop", type=float, default=1.0,
                 help="default k_min: the lowest swept k within this many points of k = 1")
  p.add_argument("--fixed_k", type=float, default=None, help="serve this one k (no adaptation)")
  p.add_argument("--max_batch_size", type=int, default=16, help="texts per model call, at most")
  p.add_argument("--max_queue_delay_ms", type=float, default=5.0,
                 help="how long the oldest request waits for a fuller batch")
  p.add_argument("--max_queue", type=int, default=256, help="texts waiting, at most; then 503")
  p.add_argument("--max_body_kb", type=int, default=1024, help="request body limit (413 above)")
  p.add_argument("--overhead_ms", type=float, default=2.0,
                 help="time a request spends outside the model, reserved from the slack")
  p.add_argument("--remeasure", action="store_true", help="time the latency table again")
  p.add_argument("--cache_dir", default="", help="persistent compilation cache (default WORKDIR/xla_cache)")
  return p.parse_args(argv)


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  from latadj_jax.runtime import workdir as wd
  wd.load_run(args.workdir)              # a bad workdir fails here, before the port opens
  from latadj_jax.serving import backend, server
  if args.fixed_k is not None:
    k_min = k_max = args.fixed_k
  else:
    k_max = args.k_max
    k_min = args.k_min if args.k_min is not None else \
        backend.default_k_range(args.workdir, args.max_drop)[0]
  config = server.ServeConfig(
      slo_ms=args.slo_ms, k_min=k_min, k_max=k_max, k_points=args.k_points,
      adaptive=args.fixed_k is None and k_min < k_max, max_batch_size=args.max_batch_size,
      max_queue_delay_ms=args.max_queue_delay_ms, max_queue=args.max_queue,
      max_body_bytes=1024 * args.max_body_kb, overhead_ms=args.overhead_ms,
      remeasure=args.remeasure)
  from latadj_jax.runtime import xla_cache
  xla_cache.setup_compilation_cache(args.cache_dir or Path(args.workdir) / "xla_cache")
  load = lambda: backend.ServedModel.from_workdir(args.workdir, config.ks, config.batch_sizes)
  print(f"serving {args.workdir} on http://{args.host}:{args.port} (pid {os.getpid()}): "
        f"SLO {args.slo_ms:g} ms, k {k_min:g}..{k_max:g}; compiling, then GET /readyz answers 200",
        flush=True)
  server.serve(server.Service(load, config), args.host, args.port)
  return 0


if __name__ == "__main__":
  cli.run(main)
