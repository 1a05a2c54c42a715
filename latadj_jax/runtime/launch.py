"""Run a script as N local processes on JAX's distributed runtime, each with its own CPU devices.

    python -m latadj_jax.launch --processes=2 --devices_per_process=2 -- \\
        train.py --config=quickstart --workdir=/tmp/mh

Process ``i`` gets the environment ``latadj_jax.runtime.multihost`` reads
(``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID=i``), CPU collectives (``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo``),
``JAX_PLATFORMS=cpu`` and ``--xla_force_host_platform_device_count``. Their
output is forwarded line by line with a ``[pI] `` prefix. When one process
fails, the others get ``--grace_s`` seconds to end on their own, then are
terminated (then killed); the launcher exits with the first failure's code.
This is for trying and testing multi-process runs on one machine; on a real
cluster, set the same variables on each host (README, "Several hosts").
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from latadj_jax.runtime import multihost


def free_port() -> int:
  """Returns a TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, index: int, processes: int, port: int, devices: int) -> dict:
  """Returns process ``index``'s environment: the distributed runtime's variables and its CPU devices."""
  flags = [f for f in base.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return {**base,
          multihost.ADDRESS: f"127.0.0.1:{port}",
          multihost.NUM_PROCESSES: str(processes),
          multihost.PROCESS_ID: str(index),
          "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
          "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
          "PYTHONUNBUFFERED": "1"}


def _forward(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
  for line in proc.stdout:
    with lock:
      sys.stdout.write(prefix + line.rstrip("\n") + "\n")
      sys.stdout.flush()


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
  """Waits up to ``grace_s`` for the running processes to end, then terminates, then kills them."""
  for sig, wait in ((None, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
    alive = [p for p in procs if p.poll() is None]
    if not alive:
      return
    if sig is not None:
      for p in alive:
        p.send_signal(sig)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(p.poll() is None for p in alive):
      time.sleep(0.05)


def exit_code(returncode: int) -> int:
  """Returns a shell-style exit status: 128 + N for a process killed by signal N."""
  return 128 - returncode if returncode < 0 else returncode


def launch(command: list[str], processes: int, devices_per_process: int, *, grace_s: float = 10.0,
           port: int = 0) -> int:
  """Runs ``command`` (a Python script or ``-m module`` and its arguments) as ``processes`` processes.

  Returns 0 when all succeed, else the exit status of the first that failed.
  """
  port = port or free_port()
  lock = threading.Lock()
  procs, threads = [], []
  try:
    for i in range(processes):
      env = process_env(dict(os.environ), i, processes, port, devices_per_process)
      procs.append(subprocess.Popen([sys.executable, *command], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    errors="replace"))
      print(f"[launch] process {i}: pid {procs[-1].pid}", flush=True)
      threads.append(threading.Thread(target=_forward, args=(procs[-1], f"[p{i}] ", lock),
                                      daemon=True))
      threads[-1].start()
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
      failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
      time.sleep(0.05)
    if failed is None:
      failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
    if failed is not None:
      print(f"[launch] process {failed} exited with {procs[failed].returncode}; stopping the "
            f"others (after {grace_s:g} s)", flush=True)
  finally:
    _stop(procs, 0.0 if sys.exc_info()[0] else grace_s)  # Ctrl-C: stop them now
    for t in threads:
      t.join(timeout=5.0)
  if failed is None:
    return 0
  print("[launch] exit codes: " + " ".join(f"p{i}={p.returncode}" for i, p in enumerate(procs)),
        flush=True)
  return exit_code(procs[failed].returncode) or 1


def main(argv: list[str]) -> int:
  if "--" not in argv:
    raise SystemExit("usage: python -m latadj_jax.launch [--processes=N] [--devices_per_process=D] "
                     "-- SCRIPT.py [ARGS...]")
  split = argv.index("--")
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--devices_per_process", type=int, default=1, help="CPU devices in each process")
  p.add_argument("--grace_s", type=float, default=10.0,
                 help="after one process fails, seconds the others get before they are stopped")
  p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  args = p.parse_args(argv[:split])
  command = argv[split + 1:]
  if not command:
    raise SystemExit("nothing to run after --")
  if args.processes < 1 or args.devices_per_process < 1:
    raise SystemExit("--processes and --devices_per_process must be at least 1")
  # A terminated launcher takes its processes with it (``launch`` stops them on the way out).
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  return launch(command, args.processes, args.devices_per_process, grace_s=args.grace_s,
                port=args.port)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
