"""Hugging Face checkpoint loading: safetensors, flax msgpack or torch bin, by one name map per family.

A checkpoint is read into a flat ``{name: np.ndarray}`` dict. Torch-style names
(``encoder.layer.0.attention.self.query.weight``) go through the family's name
map to a Flax path (``encoder/layer/0/attention/self/query/kernel``); Flax
msgpack files already use Flax paths. Each tensor is then checked against the
shape of the model's own parameter before it replaces it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from flax import traverse_util

from latadj_jax.runtime.hub import HubError, hub_endpoint, hub_problem, hub_reachable

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "flax_model.msgpack", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "vocab.json", "merges.txt", "spiece.model", "special_tokens_map.json",
                   "generation_config.json")
# A family's torch-name map: for a torch tensor name, ``(flax path, transpose?)``, or
# ``([flax paths], transpose?)`` for a fused tensor split evenly along its last axis
# (after the transpose) into several parameters; or None to skip the tensor.
NameMap = Callable[[str], "tuple[tuple[str, ...] | list[tuple[str, ...]], bool] | None"]
# Flax leaf name -> torch leaf name, for inverting a name map.
_TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


class CheckpointError(ValueError):
  """A checkpoint can't be found, read or matched to the model."""


class HubCheckpointError(CheckpointError, HubError):
  """The weights are neither local nor downloadable from the hub now."""


def _looks_like_path(name: str) -> bool:
  # Hub ids are "name" or "org/name"; anything else is meant as a local path.
  return name.startswith((".", "/", "~")) or name.count("/") > 1


def resolve_model_dir(name_or_path: str, timeout: float = 5.0) -> Path:
  """Returns a local directory holding the model's config, tokenizer and weights.

  A local directory is used as is. Anything else is a hub id, fetched with
  ``huggingface_hub`` (or found in its cache). When the hub can't be reached we
  fail at once with the flag to point at local weights, rather than hang.
  """
  path = Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  if _looks_like_path(name_or_path):
    raise CheckpointError(
        f"model directory {str(path)!r} does not exist. Pass a directory holding "
        f"config.json and one of {', '.join(WEIGHT_FILES)} with --config.model=DIR")
  from huggingface_hub import snapshot_download
  patterns = list(TOKENIZER_FILES) + list(WEIGHT_FILES) + ["*.safetensors"]
  try:  # The local cache first: it needs no network.
    return Path(snapshot_download(name_or_path, allow_patterns=patterns, local_files_only=True))
  except Exception:  # noqa: BLE001 -- any cache miss means we need the hub
    pass
  if not hub_reachable(timeout):
    raise HubCheckpointError(
        f"can't reach the Hugging Face hub ({hub_endpoint()[0]}) to download {name_or_path!r}, "
        f"and it is not in the local HF cache. Point at local weights with "
        f"--config.model=DIR (a directory with config.json, the tokenizer files and "
        f"model.safetensors, flax_model.msgpack or pytorch_model.bin).")
  problem = hub_problem(name_or_path)
  if problem:
    raise HubCheckpointError(f"{problem}, so {name_or_path!r} can't be downloaded. Try again later, "
                          f"or use local weights: --config.model=DIR")
  try:
    return Path(snapshot_download(name_or_path, allow_patterns=patterns, etag_timeout=timeout))
  except Exception as e:  # noqa: BLE001 -- turn hub errors into one clear message
    raise HubCheckpointError(f"could not download {name_or_path!r} from the hub "
                          f"({_first_line(e, 300)}). Use --config.model=DIR for local weights.") from None


def _first_line(e: BaseException, limit: int = 160) -> str:
  text = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


def _read_json(path: Path, what: str) -> dict[str, Any]:
  try:
    out = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({_first_line(e)}); restore the {what} "
                          f"from the original model, or download the model again") from None
  if not isinstance(out, dict):
    raise CheckpointError(f"{path} holds a JSON {type(out).__name__}, not an object; restore "
                          f"the {what} from the original model, or download the model again")
  return out


def check_config(hf_config: dict[str, Any], required: Mapping[str, Sequence[str]],
                 path: Path | str = "config.json") -> dict[str, Any]:
  """Returns ``hf_config`` unchanged, or raises CheckpointError if it lacks fields its family needs.

  ``required`` maps each known ``model_type`` to the config.json fields that
  fix its parameter shapes. HF's config classes default every one of them, so
  a config.json that lacks one would build a model of the wrong size and fail
  later with a confusing shape error.
  """
  if "model_type" not in hf_config:
    raise CheckpointError(
        f"{path} has no model_type, so the model family is unknown; add e.g. "
        f"\"model_type\": \"bert\" (one of {', '.join(sorted(required))}), or "
        f"restore config.json from the original model")
  model_type = hf_config["model_type"]
  missing = [f for f in required.get(model_type, ()) if hf_config.get(f) is None]
  if missing:
    raise CheckpointError(
        f"{path} lacks {', '.join(missing)}, which a {model_type} model needs to build its "
        f"parameters; restore config.json from the original model (its hub repo), or add the "
        f"fields")
  return hf_config


def read_config(model_dir: Path, required: Mapping[str, Sequence[str]]) -> dict[str, Any]:
  """Returns the HF ``config.json`` of a model directory as a dict, checked by ``check_config``."""
  path = Path(model_dir) / "config.json"
  if not path.is_file():
    raise CheckpointError(f"no config.json in {str(model_dir)!r}; is it an HF model directory?")
  return check_config(_read_json(path, "config.json"), required, path)


def _corrupt(path: Path, kind: str, e: BaseException) -> CheckpointError:
  return CheckpointError(
      f"{path} is truncated or not a valid {kind} file ({_first_line(e)}); download it again "
      f"(an interrupted download leaves such a file), or remove it to use another weight file "
      f"in that directory")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  try:
    with safe_open(str(path), framework="flax") as f:  # flax handles bf16, numpy does not
      for name in f.keys():
        out[name] = np.asarray(f.get_tensor(name))
  except Exception as e:  # noqa: BLE001 -- SafetensorError and I/O errors alike mean a bad file
    raise _corrupt(path, "safetensors", e) from None
  return out


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise CheckpointError(
        f"{path.name} is a PyTorch pickle and needs torch to read "
        f"(pip install torch), or convert it to model.safetensors") from None
  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 -- truncated zip, garbage pickle, EOF: all a bad file
    raise _corrupt(path, "PyTorch checkpoint", e) from None
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise _corrupt(path, "PyTorch checkpoint",
                   TypeError(f"it holds a {type(state).__name__}, not a dict of tensors"))
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
          for k, v in state.items()}


def _read_msgpack(path: Path) -> dict[str, np.ndarray]:
  from flax import serialization
  try:
    tree = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # noqa: BLE001 -- msgpack raises ValueError, ExtraData, ...
    raise _corrupt(path, "Flax msgpack", e) from None
  if not isinstance(tree, dict):
    raise _corrupt(path, "Flax msgpack",
                   TypeError(f"it holds a {type(tree).__name__}, not a dict of arrays"))
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _read_sharded(index: Path, reader) -> dict[str, np.ndarray]:
  weight_map = _read_json(index, "shard index").get("weight_map")
  if not isinstance(weight_map, dict):
    raise CheckpointError(f"{index} has no weight_map; download the model again")
  out: dict[str, np.ndarray] = {}
  for name in sorted(set(weight_map.values())):
    if not (index.parent / name).is_file():
      raise CheckpointError(f"{index} lists the shard {name}, which is missing from "
                            f"{index.parent}; download the model again")
    out.update(reader(index.parent / name))
  return out


def read_weights(model_dir: Path) -> tuple[dict[str, np.ndarray], str]:
  """Returns ``(flat tensors, format)``; format is ``"torch"`` (dotted names) or ``"flax"``."""
  model_dir = Path(model_dir)
  if not model_dir.is_dir():
    raise CheckpointError(f"model directory {str(model_dir)!r} does not exist")
  readers = {
      "model.safetensors": (_read_safetensors, "torch"),
      "model.safetensors.index.json": (lambda p: _read_sharded(p, _read_safetensors), "torch"),
      "flax_model.msgpack": (_read_msgpack, "flax"),
      "pytorch_model.bin": (_read_torch_bin, "torch"),
      "pytorch_model.bin.index.json": (lambda p: _read_sharded(p, _read_torch_bin), "torch"),
  }
  for name in WEIGHT_FILES:
    if (model_dir / name).is_file():
      reader, fmt = readers[name]
      return reader(model_dir / name), fmt
  raise CheckpointError(
      f"no weight file in {str(model_dir)!r}: looked for {', '.join(WEIGHT_FILES)}")


@dataclasses.dataclass
class LoadReport:
  """What a load did: tensors loaded, model parameters left at init, tensors unused."""
  loaded: list[str]
  missing: list[str]
  unused: list[str]


def _match(path: tuple[str, ...], targets: Mapping, prefix: str) -> tuple[str, ...] | None:
  """Returns the model path a checkpoint path refers to, adding or dropping the body prefix."""
  for candidate in (path, (prefix,) + path, path[1:] if path[:1] == (prefix,) else None):
    if candidate is not None and candidate in targets:
      return candidate
  return None


def load_weights(params: Mapping, tensors: Mapping[str, np.ndarray], fmt: str,
                 name_map: NameMap, base_prefix: str) -> tuple[dict, LoadReport]:
  """Returns ``(params with checkpoint tensors in place, report)``.

  Shapes are checked against ``params`` (real arrays, or ShapeDtypeStructs from
  ``jax.eval_shape``); parameters the checkpoint lacks keep their value.
  ``name_map`` is the family's torch-name map; ``base_prefix`` the body's scope
  in head models (HF's ``base_model_prefix``), added or dropped as needed.
  """
  targets = traverse_util.flatten_dict(dict(params))
  out = dict(targets)
  loaded, unused = [], []
  for name, value in tensors.items():
    mapped = (tuple(name.split("/")), False) if fmt == "flax" else name_map(name)
    if fmt == "flax" and _match(mapped[0], targets, base_prefix) is None:
      name, value = _as_torch(name, value)  # another layout's Flax names (HF's Flax GPT-2)
      mapped = name_map(name)
    if mapped is None:
      continue
    paths, transpose = mapped
    fused = isinstance(paths, list)
    paths = paths if fused else [paths]
    found = [_match(tuple(p), targets, base_prefix) for p in paths]
    if None in found:
      unused.append(name)
      continue
    value = np.asarray(value).T if transpose else np.asarray(value)
    parts = np.split(value, len(found), axis=-1) if fused else [value]
    for target, part in zip(found, parts):
      want = tuple(targets[target].shape)
      if part.shape != want:
        raise CheckpointError(
            f"shape mismatch for parameter {'/'.join(target)} (checkpoint tensor {name!r}): "
            f"checkpoint {part.shape}, model {want}")
      out[target] = part.astype(np.dtype(targets[target].dtype))
      loaded.append("/".join(target))
  missing = sorted("/".join(p) for p in targets if "/".join(p) not in set(loaded))
  return traverse_util.unflatten_dict(out), LoadReport(loaded, missing, sorted(unused))


def _as_torch(flax_name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """Returns the torch name and layout of a Flax tensor (``a/b/kernel`` -> ``a.b.weight``, transposed)."""
  *module, leaf = flax_name.split("/")
  value = np.asarray(value).T if leaf == "kernel" else value
  return ".".join(module + [_TORCH_LEAF.get(leaf, leaf)]), value


def invert_name_map(params: Any, name_map: NameMap) -> dict[str, np.ndarray]:
  """Returns the float32 torch-layout tensors of ``params`` by torch name, via the inverted name map.

  A Flax path ``a/b/kernel`` becomes ``a.b.weight``, and ``name_map`` must
  send that name back to the same path (it also says whether to transpose), so
  an export can never drift from the loader. Raises CheckpointError for a
  parameter whose generated name does not map back (a family whose names
  need an explicit inverse).
  """
  out = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    name = ".".join(path[:-1] + (_TORCH_LEAF.get(path[-1], path[-1]),))
    mapped = name_map(name)
    if mapped is None or isinstance(mapped[0], list) or tuple(mapped[0]) != tuple(path):
      raise CheckpointError(f"can't export parameter {'/'.join(path)}: its torch name {name!r} "
                            f"maps back to {mapped and mapped[0]!r}; this family's name map "
                            f"needs an explicit inverse")
    array = np.asarray(value, dtype=np.float32)
    out[name] = np.ascontiguousarray(array.T if mapped[1] else array)
  return out
