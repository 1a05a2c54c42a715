"""Language-model data: text as fixed-length next-token blocks, and LAMBADA-style last-word examples.

Text comes from a local directory of ``.txt`` files, one ``.txt`` file, or an HF
hub dataset with a ``text`` column (WikiText-103). Documents are tokenized,
joined into one token stream (local files get an EOS token between them) and
cut into blocks of ``block_size + 1`` tokens that overlap by one: the inputs
are a block's first ``block_size`` tokens and the targets the same block
shifted by one, so the input at position ``p`` predicts the target at ``p``.

The blocks are stored as a ``pipeline.Encoded`` (every row one block), so the
classifier's shuffled, resumable batch iterator and its ACC profiling run on
them unchanged; ``LMEncoded`` adds the targets.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from latadj_jax.data import pipeline, sources
from latadj_jax.runtime import hub

EOS = "<|endoftext|>"
LOCAL_FIX = "--config.data_dir=DIR (a directory of .txt files, or one .txt file)"
_SPLIT_PREFIXES = {"train": ("train",), "validation": ("validation", "valid", "dev"),
                   "test": ("test",)}
_CHUNK_CHARS = 1 << 20  # tokenizer calls on ~1 MB pieces: fast, bounded memory


# --- tokenizers ---------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
  """Returns GPT-2's printable stand-in character for each byte (the ByteLevel alphabet)."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = dict(zip(keep, keep)), 0
  for b in range(256):
    if b not in chars:
      chars[b], extra = 256 + extra, extra + 1
  return {b: chr(c) for b, c in chars.items()}


def byte_tokenizer():
  """Returns a byte-level HF fast tokenizer: token id = UTF-8 byte value, plus EOS as id 256.

  Built with no training and no download, so a from-scratch model can run
  fully offline; it saves and reloads with ``AutoTokenizer`` like any other.
  """
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS,
                                              model_max_length=1 << 30)


def load_tokenizer(spec: str, model_dir: Path | None):
  """Returns the tokenizer named by ``spec``: "byte", "model" (the model directory's), or a path/hub id."""
  import transformers
  if spec == "byte":
    return byte_tokenizer()
  if spec == "model":
    if model_dir is None:
      raise ValueError("--config.tokenizer=model needs pretrained weights (--config.model=DIR or "
                       "an HF id); a from-scratch model takes --config.tokenizer=byte")
    spec = str(model_dir)
  tok = transformers.AutoTokenizer.from_pretrained(spec)
  tok.model_max_length = 1 << 30  # we cut blocks ourselves; silence the length warning
  return tok


# --- raw text -----------------------------------------------------------------------------------
def _split_lines(text: str, split: str, dev_fraction: float) -> str:
  """Returns the head (train) or tail (validation) of a document, cut at a line boundary."""
  lines = text.splitlines(keepends=True)
  cut = int(round(len(lines) * (1 - dev_fraction)))
  return "".join(lines[:cut] if split == "train" else lines[cut:])


def read_local(data_dir: str, split: str, dev_fraction: float = 0.1) -> list[str]:
  """Returns the documents of ``split`` from a directory of ``.txt`` files or one file.

  Files whose names start with the split (``train*.txt``, ``valid*.txt``,
  ``test*.txt``) are that split. Without such files every file is split by
  lines: its first ``1 - dev_fraction`` goes to train, the rest to validation,
  so the held-out text covers every file.
  """
  root = Path(data_dir).expanduser()
  if not root.exists():
    raise sources.DataUnavailableError(f"data_dir {root} does not exist. Pass {LOCAL_FIX}.")
  files = [root] if root.is_file() else sorted(root.glob("*.txt"))
  if not files:
    raise sources.DataUnavailableError(f"no .txt files in {root}. Pass {LOCAL_FIX}.")
  named = {s: [f for f in files if f.name.lower().startswith(p)] for s, p in _SPLIT_PREFIXES.items()}
  if any(named.values()):
    if not named.get(split):
      raise sources.DataUnavailableError(
          f"{root} has split files but none for {split!r} (expected a name starting with "
          f"{' or '.join(_SPLIT_PREFIXES.get(split, (split,)))})")
    return [f.read_text(encoding="utf-8-sig") for f in named[split]]
  if split not in ("train", "validation"):
    raise sources.DataUnavailableError(f"{root} has no {split!r} files; only train and "
                                       f"validation can be split off plain .txt files")
  return [_split_lines(f.read_text(encoding="utf-8-sig"), split, dev_fraction) for f in files]


def _hub(name: str, config_name: str | None, split: str, what: str):
  """Returns the HF ``datasets`` split, failing at once (with the local fix) when offline."""
  fix = f"Download it elsewhere and pass {LOCAL_FIX}."
  problem = hub.dataset_problem(name)
  if problem:
    raise sources.HubDataError(f"tried to load {what}, but {problem}. {fix}")
  try:
    import datasets
    return datasets.load_dataset(name, config_name or None, split=split)
  except Exception as e:  # any datasets/network failure becomes one actionable message
    raise sources.HubDataError(f"tried to load {what} split {split!r} and failed "
                               f"({type(e).__name__}: {e}). {fix}") from e


def read_hub(name: str, config_name: str, split: str) -> list[str]:
  """Returns a hub dataset's split as one document (its ``text`` rows joined as they are).

  WikiText's raw rows already end in newlines, so joining with nothing
  restores the article text.
  """
  ds = _hub(name, config_name, split, f"the HF hub dataset {name}/{config_name}")
  return ["".join(ds["text"])]


def load_texts(config, split: str) -> list[str]:
  """Returns the documents of ``split`` from the configured source (``data_source`` auto|local|hub)."""
  source = config.data_source
  if source == "auto":
    source = "local" if config.data_dir else "hub"
  if source == "local":
    if not config.data_dir:
      raise sources.DataUnavailableError(f"data_source=local needs a path; pass {LOCAL_FIX}.")
    return read_local(config.data_dir, split, config.dev_fraction)
  if source == "hub":
    if not config.hub_dataset:
      raise sources.DataUnavailableError(f"no --config.hub_dataset to load; pass {LOCAL_FIX}.")
    return read_hub(config.hub_dataset, config.get("hub_config", ""), split)
  raise ValueError(f"unknown data source {source!r} for a language model; use auto, local or hub")


# --- token blocks -------------------------------------------------------------------------------
def tokenize_stream(docs: Sequence[str], tokenizer, eos_between: bool = True) -> np.ndarray:
  """Returns the documents tokenized and joined into one int32 stream (EOS between documents)."""
  eos = tokenizer.eos_token_id
  parts: list[np.ndarray] = []
  for i, doc in enumerate(d for d in docs if d):
    if i and eos_between and eos is not None:
      parts.append(np.asarray([eos], np.int32))
    # Cut long documents at newlines so no tokenizer call holds the whole corpus.
    start = 0
    while start < len(doc):
      end = doc.find("\n", start + _CHUNK_CHARS)
      end = len(doc) if end < 0 else end + 1
      ids = tokenizer(doc[start:end], add_special_tokens=False)["input_ids"]
      parts.append(np.asarray(ids, np.int32))
      start = end
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


@dataclasses.dataclass
class LMEncoded(pipeline.Encoded):
  """Next-token blocks: ``input_ids[i]`` and ``targets[i]`` (the same block shifted by one)."""
  targets: list[np.ndarray] = dataclasses.field(default_factory=list)

  @property
  def num_targets(self) -> int:
    return int(sum(len(t) for t in self.targets))


def make_blocks(stream: np.ndarray, block_size: int, max_blocks: int = 0) -> LMEncoded:
  """Returns the stream cut into next-token blocks of ``block_size`` (the last may be shorter).

  Every token after the first is a target exactly once.
  """
  if block_size < 2:
    raise ValueError(f"block_size must be at least 2, got {block_size}")
  if len(stream) < 2:
    raise sources.DataUnavailableError(f"the text has {len(stream)} tokens; a language model "
                                       f"needs at least 2")
  starts = range(0, len(stream) - 1, block_size)
  if max_blocks > 0:
    starts = starts[:max_blocks]
  inputs = [stream[s:s + block_size] for s in starts]
  targets = [stream[s + 1:s + 1 + block_size] for s in starts]
  inputs = [x[:len(y)] for x, y in zip(inputs, targets)]
  return LMEncoded(input_ids=inputs, token_type_ids=[np.zeros_like(x) for x in inputs],
                   labels=np.zeros(len(inputs), np.int32), num_truncated=0, max_len=block_size,
                   targets=targets)


def lm_batches(enc: LMEncoded, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
               start_batch: int = 0, pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields [batch, block_size] batches with ``targets`` and ``target_weights`` (0 on padding)."""
  for batch in pipeline.batch_iterator(enc, batch_size, (enc.max_len,), shuffle=shuffle,
                                       seed=seed, epoch=epoch, start_batch=start_batch,
                                       pad_id=pad_id):
    targets = np.zeros_like(batch["input_ids"])
    for j, r in enumerate(batch["index"]):
      if r >= 0:
        targets[j, :len(enc.targets[r])] = enc.targets[r]
    batch["targets"] = targets
    batch["target_weights"] = batch["attention_mask"].astype(np.float32)
    yield batch


# --- LAMBADA-style last-word examples -----------------------------------------------------------
def read_jsonl_texts(path: str | Path, max_examples: int = 0) -> list[str]:
  """Returns the ``text`` field of each line of a JSONL file."""
  path = Path(path).expanduser()
  if not path.is_file():
    raise sources.DataUnavailableError(f"no LAMBADA-style file at {path}: pass a JSONL file of "
                                       '{"text": ...} lines (or an HF hub dataset name)')
  texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
  return texts[:max_examples] if max_examples > 0 else texts


def load_last_word_texts(source: str, max_examples: int = 0) -> list[str]:
  """Returns passages from a local JSONL file, or an HF hub dataset's test split (``text`` column)."""
  looks_local = source.endswith((".jsonl", ".json")) or Path(source).expanduser().exists()
  if looks_local:
    return read_jsonl_texts(source, max_examples)
  texts = list(_hub(source, None, "test", f"the HF hub dataset {source}")["text"])
  return texts[:max_examples] if max_examples > 0 else texts


@dataclasses.dataclass
class LastWord:
  """Each passage as context tokens and the tokens of its last word (with its leading space)."""
  contexts: list[np.ndarray]
  targets: list[np.ndarray]

  def __len__(self) -> int:
    return len(self.contexts)


def encode_last_word(texts: Sequence[str], tokenizer, max_context: int) -> LastWord:
  """Returns the passages split at their last space, tokenized as lm-eval-harness does.

  Context and `` word`` are tokenized separately, so the target tokens are the
  ones a model would have to generate. Contexts longer than ``max_context``
  keep their last ``max_context`` tokens.
  """
  contexts, targets = [], []
  for text in texts:
    text = text.rstrip()
    cut = text.rfind(" ")
    if cut <= 0:
      raise ValueError(f"passage has no last word to predict: {text[:60]!r}")
    ctx = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    tgt = tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
    contexts.append(np.asarray(ctx[-max_context:], np.int32))
    targets.append(np.asarray(tgt, np.int32))
  return LastWord(contexts, targets)


def last_word_batches(lw: LastWord, batch_size: int, buckets: Sequence[int], num_targets: int,
                      pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields right-padded context batches by bucket with [B, num_targets] targets and their mask."""
  enc = pipeline.Encoded(lw.contexts, [np.zeros_like(c) for c in lw.contexts],
                         np.zeros(len(lw), np.int32), 0, max(buckets))
  for batch in pipeline.batch_iterator(enc, batch_size, buckets, shuffle=False, pad_id=pad_id):
    targets = np.zeros((batch_size, num_targets), np.int32)
    tmask = np.zeros((batch_size, num_targets), np.float32)
    for j, r in enumerate(batch["index"]):
      if r >= 0:
        t = lw.targets[r][:num_targets]
        targets[j, :len(t)], tmask[j, :len(t)] = t, 1.0
    batch["targets"], batch["target_mask"] = targets, tmask
    yield batch


def load_blocks(config, tokenizer, split: str, max_blocks: int = 0) -> LMEncoded:
  """Returns one split as next-token blocks of ``config.block_size``."""
  stream = tokenize_stream(load_texts(config, split), tokenizer)
  blocks = make_blocks(stream, config.block_size, max_blocks)
  capped = f" (the first {max_blocks}, by the config)" if max_blocks > 0 else ""
  print(f"{split}: {len(stream):,} tokens; {len(blocks)} blocks of {config.block_size}{capped}")
  return blocks
