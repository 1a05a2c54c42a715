"""A run's workdir: the config, model config, tokenizer, profile and orbax checkpoints.

Everything ``eval.py`` needs lives here, so evaluation needs only ``--workdir``
(no hub, no original model directory).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp

from latadj_jax.core import schedule

CONFIG = "config.json"
MODEL_CONFIG = "model_config.json"
PROFILE = "profile.json"
TOKENIZER = "tokenizer"
CHECKPOINTS = "checkpoints"
BEST = "best"              # the parameters chosen by the mean dev metric over a k grid
BEST_JSON = "best.json"    # which step they are, and its scores
COMPLETE = "complete.json"  # written when training reached its last step (absent after a kill)


class WorkdirError(ValueError):
  """The workdir lacks what a command needs; the message says what to run first."""


def write_json(path: Path, obj: Any) -> None:
  """Writes ``obj`` as JSON atomically (a temp file, then a rename), so a kill never leaves half a file."""
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(f"{path}.tmp")
  tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
  os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
  if hasattr(x, "tolist"):
    return x.tolist()
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  raise TypeError(f"not JSON serialisable: {type(x)}")


def save_metadata(workdir: Path, config: ml_collections.ConfigDict, hf_config: dict,
                  tokenizer: Any) -> None:
  """Stores the run config, the HF model config and the tokenizer beside the checkpoints."""
  workdir.mkdir(parents=True, exist_ok=True)
  write_json(workdir / CONFIG, config.to_dict())
  write_json(workdir / MODEL_CONFIG, hf_config)
  if tokenizer is not None:
    tokenizer.save_pretrained(str(workdir / TOKENIZER))


def save_profile(workdir: Path, profile: schedule.Profile | None, ep: tuple[float, ...],
                 schedules: dict[int, tuple[int, ...]], coeff: float) -> None:
  """Writes ``profile.json``: the raw ACC points, the fit, EP and the per-bucket schedules."""
  write_json(workdir / PROFILE, {
      "acc": profile.acc if profile else None, "fit": profile.fit if profile else None,
      "ep": ep, "coeff": coeff,
      "schedules": {str(b): list(c) for b, c in schedules.items()},
      "expected_speedup": {str(b): schedule.expected_speedup(b, c) for b, c in schedules.items()},
  })


def load_profile(workdir: Path) -> tuple[float, ...] | None:
  """Returns the stored EP, or None when the workdir has no profile yet."""
  path = Path(workdir) / PROFILE
  return tuple(json.loads(path.read_text())["ep"]) if path.is_file() else None


@dataclasses.dataclass
class Run:
  """What a finished (or running) training run left in its workdir."""
  workdir: Path
  config: ml_collections.ConfigDict
  hf_config: dict
  profile: tuple[float, ...]


def run_kind(config: Any, known: Sequence[str]) -> str:
  """Returns a workdir config's ``run`` (one of ``known``), or raises WorkdirError saying what to do."""
  kind = config.get("run")
  if kind not in known:
    raise WorkdirError(f"this workdir's run is {kind!r}; this command takes {', '.join(known)} "
                       f"runs" + ("" if kind else " (a workdir trained before runs were named: "
                                  "retrain it with train.py)"))
  return kind


def load_run(workdir: str | Path) -> Run:
  """Returns the stored config, model config and profile, or raises WorkdirError."""
  workdir = Path(workdir).expanduser()
  if not (workdir / CONFIG).is_file():
    raise WorkdirError(f"{str(workdir)!r} is not a training workdir (no {CONFIG}). "
                       f"Train first: python train.py --config=NAME --workdir={workdir}")
  config = ml_collections.ConfigDict(json.loads((workdir / CONFIG).read_text()))
  hf_config = json.loads((workdir / MODEL_CONFIG).read_text())
  profile = load_profile(workdir)
  if profile is None:
    raise WorkdirError(f"no {PROFILE} in {str(workdir)!r}: the run did not get past profiling")
  return Run(workdir, config, hf_config, profile)


def checkpoint_manager(workdir: Path, keep: int = 2,
                       folder: str = CHECKPOINTS) -> ocp.CheckpointManager:
  """Returns an orbax manager over ``workdir/folder`` (async saves; keeps ``keep``)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager((Path(workdir) / folder).resolve(), options=options)


def load_best(workdir: Path) -> dict | None:
  """Returns ``best.json`` (step, score, metrics of the chosen checkpoint), or None."""
  path = Path(workdir) / BEST_JSON
  return json.loads(path.read_text()) if path.is_file() else None


def save_best(manager: ocp.CheckpointManager, workdir: Path, params: Any, best: dict,
              write: bool = True) -> None:
  """Saves ``params`` as the chosen checkpoint, then records ``best`` in ``best.json``.

  The JSON is written only once the parameters are committed, so it never
  names a checkpoint that is not there.
  """
  manager.save(best["step"], args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
               force=True)
  manager.wait_until_finished()
  if write:
    write_json(Path(workdir) / BEST_JSON, best)


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves params, optimizer state and step; orbax commits each step atomically."""
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.JsonSave({"step": int(step)})))


def restore_state(manager: ocp.CheckpointManager, state: Any) -> Any:
  """Returns ``state`` restored from the latest checkpoint (``state`` gives the structure)."""
  step = manager.latest_step()
  abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract(state.params)),
      opt_state=ocp.args.StandardRestore(abstract(state.opt_state)),
      meta=ocp.args.JsonRestore()))
  return state.replace(params=restored.params, opt_state=restored.opt_state,
                       step=restored.meta["step"])


def restore_params(workdir: Path, abstract_params: Any) -> tuple[Any, int]:
  """Returns ``(params, step)`` of the chosen checkpoint, or raises WorkdirError if there is none.

  The chosen one is the best by the mean dev metric over a k grid when the run
  selected (``best.json``), else the latest.
  """
  best = load_best(workdir)
  path = Path(workdir) / (BEST if best else CHECKPOINTS)
  manager = ocp.CheckpointManager(path.resolve()) if path.is_dir() else None
  step = (best["step"] if best else manager.latest_step()) if manager else None
  if step is None:
    raise WorkdirError(f"no checkpoint in {str(path)!r}: nothing to evaluate. "
                       f"Train first, or point --workdir at a finished run")
  # Onto this process's first device, whatever mesh (devices, processes) saved it.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_params = jax.tree.map(
      lambda x: x if getattr(x, "sharding", None) else jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                              sharding=device),
      abstract_params)
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params)))
  return restored.params, step
