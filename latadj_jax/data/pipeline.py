"""Tokenization and length-bucketed batching with static shapes (one compile per bucket)."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from latadj_jax.data.sources import Examples

_CHUNK = 2048  # examples per tokenizer call: large enough to be fast, small enough for a live bar
_PROGRESS_MIN = 10_000


def make_buckets(max_len: int, base: Sequence[int] = (32, 64, 128, 256, 512)) -> tuple[int, ...]:
  """Returns the sorted base lengths below ``max_len``, then ``max_len`` itself."""
  return tuple(sorted(b for b in set(base) if b < max_len)) + (max_len,)


@dataclasses.dataclass
class Encoded:
  """Tokenized examples: ragged int32 ids with special tokens, and their labels."""
  input_ids: list[np.ndarray]
  token_type_ids: list[np.ndarray]
  labels: np.ndarray
  num_truncated: int
  max_len: int

  def __len__(self) -> int:
    return len(self.labels)


def _progress(total: int):
  if total <= _PROGRESS_MIN:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc="tokenize", unit="ex")


def encode(examples: Examples, tokenizer, max_len: int) -> Encoded:
  """Returns the examples tokenized (pairs for two text columns) and truncated to ``max_len``."""
  if len(examples.texts) not in (1, 2):
    raise ValueError(f"expected 1 or 2 text columns, got {len(examples.texts)}")
  pair = len(examples.texts) == 2
  specials = tokenizer.num_special_tokens_to_add(pair=pair)
  n = len(examples.labels)
  ids: list[np.ndarray] = []
  types: list[np.ndarray] = []
  truncated = 0
  bar = _progress(n)
  for start in range(0, n, _CHUNK):
    cols = [col[start:start + _CHUNK] for col in examples.texts]
    out = tokenizer(*cols, truncation="longest_first" if pair else True, max_length=max_len,
                    return_attention_mask=False, return_token_type_ids=True)
    truncated += _count_truncated(tokenizer, cols, out["input_ids"], max_len, specials)
    tt = out.get("token_type_ids") or [[0] * len(seq) for seq in out["input_ids"]]
    ids += [np.asarray(seq, np.int32) for seq in out["input_ids"]]
    types += [np.asarray(t, np.int32) for t in tt]
    if bar is not None:
      bar.update(len(cols[0]))
  if bar is not None:
    bar.close()
  return Encoded(ids, types, examples.labels.copy(), int(truncated), max_len)


def _count_truncated(tokenizer, cols, ids, max_len: int, specials: int) -> int:
  """Returns how many rows lost tokens, re-tokenizing untruncated only the rows that came out full."""
  full = [i for i, seq in enumerate(ids) if len(seq) >= max_len]
  if not full:
    return 0
  raw = tokenizer(*[[col[i] for i in full] for col in cols], add_special_tokens=False, truncation=False,
                  return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]
  return sum(len(x) + specials > max_len for x in raw)  # a pair comes back merged into one row


def bucket_of(length: int, buckets: Sequence[int]) -> int:
  """Returns the smallest bucket that holds ``length`` tokens."""
  for b in sorted(buckets):
    if length <= b:
      return b
  raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {max(buckets)}")


def _bucket_rows(encoded: Encoded, buckets: Sequence[int]) -> dict[int, np.ndarray]:
  """Returns the example indices of each non-empty bucket, in input order."""
  of = np.asarray([bucket_of(len(x), buckets) for x in encoded.input_ids], dtype=np.int64)
  return {b: np.flatnonzero(of == b) for b in sorted(set(buckets)) if np.any(of == b)}


def num_batches(encoded: Encoded, batch_size: int, buckets: Sequence[int]) -> int:
  """Returns the number of batches in one epoch (each bucket's last batch padded, never dropped)."""
  return sum(-(-len(rows) // batch_size) for rows in _bucket_rows(encoded, buckets).values())


def _plan(encoded: Encoded, batch_size: int, buckets: Sequence[int], shuffle: bool, seed: int,
          epoch: int) -> list[tuple[int, np.ndarray]]:
  """Returns the epoch's batches as (bucket length, example indices)."""
  rng = np.random.default_rng((seed, epoch)) if shuffle else None
  plan = []
  for b, rows in _bucket_rows(encoded, buckets).items():
    if rng is not None:
      rows = rng.permutation(rows)
    plan += [(b, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
  if rng is not None:
    plan = [plan[i] for i in rng.permutation(len(plan))]
  return plan


def make_batch(encoded: Encoded, rows: np.ndarray, length: int, batch_size: int,
               pad_id: int = 0) -> dict[str, np.ndarray]:
  """Returns one [batch_size, length] batch of ``rows``, filled with weight-0 dummy rows."""
  ids = np.full((batch_size, length), pad_id, np.int32)
  types = np.zeros((batch_size, length), np.int32)
  mask = np.zeros((batch_size, length), np.int32)
  label_dtype = np.float32 if np.issubdtype(encoded.labels.dtype, np.floating) else np.int32
  labels = np.zeros(batch_size, label_dtype)
  weights = np.zeros(batch_size, np.float32)
  index = np.full(batch_size, -1, np.int32)
  for j, r in enumerate(rows):
    n = len(encoded.input_ids[r])
    ids[j, :n] = encoded.input_ids[r]
    types[j, :n] = encoded.token_type_ids[r]
    mask[j, :n] = 1
  k = len(rows)
  labels[:k] = encoded.labels[rows]
  weights[:k] = 1.0
  index[:k] = rows
  return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels,
          "weights": weights, "index": index}


def batch_iterator(encoded: Encoded, batch_size: int, buckets: Sequence[int], *, shuffle: bool,
                   seed: int = 0, epoch: int = 0, start_batch: int = 0,
                   pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields one epoch of padded batches, each from a single bucket, skipping ``start_batch``.

  With ``shuffle`` the examples within buckets and the batch order are permuted from
  ``(seed, epoch)``; without it the order is by bucket, then input order.
  """
  # The whole plan is cheap index work, so resuming only skips building the padded arrays.
  for length, rows in _plan(encoded, batch_size, buckets, shuffle, seed, epoch)[start_batch:]:
    yield make_batch(encoded, rows, length, batch_size, pad_id)
