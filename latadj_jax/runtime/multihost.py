"""Several processes on JAX's distributed runtime: start-up, feeding rows, and combining results.

One process per host (a TPU pod, a GPU cluster), or several CPU processes on
one machine (``latadj_jax.launch``, the tests). Every process runs the same
program over the same deterministic batch plan; the training step is one
global ``shard_map`` over the ``'data'`` mesh axis, to which each process
feeds only the rows of its own devices. Evaluation and ACC profiling run on
each process's local device: process ``i`` of ``n`` takes batches
``i, i + n, ...`` and the results are gathered, checking that every example
came from exactly one process.

Environment, read by ``initialize_from_env`` (``latadj_jax.launch`` sets it):

  JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator, e.g. 10.0.0.1:1234
  JAX_NUM_PROCESSES        how many processes take part
  JAX_PROCESS_ID           this process's index, 0 .. JAX_NUM_PROCESSES - 1
  LATADJ_MULTIHOST=1       initialize even without them: JAX detects TPU pods, SLURM or Open MPI

JAX reads ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` (``gloo``, its default, for
CPU processes) and ``XLA_FLAGS`` itself.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ADDRESS, NUM_PROCESSES, PROCESS_ID, AUTO = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "LATADJ_MULTIHOST")


def initialize_from_env() -> bool:
  """Returns True after starting JAX's distributed runtime from the environment; False if not asked to."""
  env = os.environ
  if not (env.get(ADDRESS) or env.get(AUTO)):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs: dict[str, Any] = {}
  if env.get(ADDRESS):
    kwargs["coordinator_address"] = env[ADDRESS]
  if env.get(NUM_PROCESSES):
    kwargs["num_processes"] = int(env[NUM_PROCESSES])
  if env.get(PROCESS_ID):
    kwargs["process_id"] = int(env[PROCESS_ID])
  jax.distributed.initialize(**kwargs)
  return True


def is_main() -> bool:
  """Returns True on the process that writes the workdir's files (process 0)."""
  return jax.process_index() == 0


# --- training: global arrays ---------------------------------------------------------------------
def local_rows(sharding: jax.sharding.Sharding, num_rows: int) -> np.ndarray:
  """Returns the global row indices this process feeds for a batch sharded on its first axis.

  They are in the order ``make_array_from_process_local_data`` maps local
  rows onto this process's devices (by global position), whatever the mesh's
  device order.
  """
  spans = {(s[0].start or 0, num_rows if s[0].stop is None else s[0].stop)
           for s in sharding.addressable_devices_indices_map((num_rows,)).values()}
  return np.concatenate([np.arange(a, b) for a, b in sorted(spans)])


def feed(batch: dict, mesh: jax.sharding.Mesh, keys: Sequence[str]) -> dict:
  """Returns ``batch[keys]`` as global arrays sharded over ``'data'``, from this process's rows only."""
  sharding = NamedSharding(mesh, P("data"))
  out = {}
  for name in keys:
    host = np.asarray(batch[name])
    rows = local_rows(sharding, host.shape[0])
    out[name] = jax.make_array_from_process_local_data(sharding, host[rows], host.shape)
  return out


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Returns ``tree`` replicated on every device of ``mesh`` (each process holds the same values)."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = np.asarray(x)  # a process-local array cannot be moved onto other hosts' devices
    host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype))  # a Python int step: int32
    return jax.make_array_from_process_local_data(sharding, host, host.shape)
  return jax.tree.map(put, tree)


def host_local(tree: Any) -> Any:
  """Returns replicated arrays as their copy on this process's first device, for local work.

  Evaluation then runs once per process, on one device, with one process or
  several alike (a jit over mesh-replicated params would repeat it on every
  device, and cannot run on one process alone when the mesh spans several).
  """
  def local(x):
    if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
      return x
    if not x.is_fully_replicated:
      raise ValueError(f"a {x.sharding} array is not whole on any one device")
    return x.addressable_data(0)
  return jax.tree.map(local, tree)


# --- evaluation: a share of the batches per process ---------------------------------------------
def part() -> tuple[int, int]:
  """Returns ``(i, n)``: this process takes every ``n``-th batch, starting from the ``i``-th."""
  return jax.process_index(), jax.process_count()


def allgather(x: np.ndarray) -> list[np.ndarray]:
  """Returns every process's ``x`` (same shape and dtype everywhere), bit for bit, in process order.

  The bytes travel, not the values: JAX would otherwise cast float64 to float32.
  """
  x = np.ascontiguousarray(x)
  if jax.process_count() == 1:
    return [x]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(x.tobytes(), np.uint8)
  gathered = multihost_utils.process_allgather(raw)
  return [np.frombuffer(g.tobytes(), x.dtype).reshape(x.shape) for g in gathered]


def gather_rows(values: np.ndarray, owned: np.ndarray) -> np.ndarray:
  """Returns ``values`` with each row taken from the one process that computed it.

  ``owned[r]`` says this process computed row ``r``. Raises RuntimeError when a
  row was computed by no process or by several, so nothing is dropped or
  counted twice.
  """
  owned = np.asarray(owned, bool)
  owners = np.stack(allgather(owned))
  per_row = owners.sum(0)
  if not np.all(per_row == 1):
    bad = np.flatnonzero(per_row != 1)
    raise RuntimeError(f"{len(bad)} of {len(per_row)} rows computed by {sorted(set(per_row[bad]))} "
                       f"processes, not exactly one (first: row {bad[0]})")
  parts = np.stack(allgather(values))
  return parts[owners.argmax(0), np.arange(len(per_row))]


def from_main(values: Sequence[float] | None, size: int) -> tuple[float, ...] | None:
  """Returns process 0's ``values`` (``size`` floats, or None) on every process, exactly."""
  packed = np.zeros(size + 1, np.float64)
  if values is not None:
    packed[0], packed[1:] = 1.0, np.asarray(values, np.float64)
  main = allgather(packed)[0]
  return tuple(float(v) for v in main[1:]) if main[0] else None


def wait_for_all(name: str, timeout_s: int = 24 * 3600) -> None:
  """Returns once every process has reached barrier ``name`` (a unique name per barrier).

  The processes that finish first wait here rather than at exit, where JAX's
  shutdown barrier would give up after five minutes, while process 0 writes
  its reports.
  """
  if jax.process_count() > 1:
    import orbax.checkpoint as ocp
    ocp.multihost.sync_global_processes(name, timeout=timeout_s,
                                        processes=set(range(jax.process_count())))
