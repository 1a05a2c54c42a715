"""Passkey retrieval: does elimination keep the one token that matters? (issue 24)

A random five-digit number is hidden at a chosen depth of repetitive filler
text, and the prompt ends by asking for it (the test of Mohtashami and Jaggi,
2023, used by LongLoRA, StreamingLLM and others). The model answers greedily;
a prompt counts as retrieved when the first number in the answer is the key.
No data is needed. Every prompt of one length has exactly that many tokens,
so a whole length is one static-shape batch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the pass key.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclasses.dataclass
class Prompts:
  """Token prompts of one length, with the hidden keys and where they sit."""
  input_ids: np.ndarray   # [E, N] int32
  keys: list[str]
  depths: list[float]     # the needle's start as a fraction of the filler
  needle_positions: list[int]  # the needle's first token
  needle_lengths: list[int]    # its number of tokens


def make(tokenizer, length: int, depths: Sequence[float], seed: int = 0) -> Prompts:
  """Returns one prompt of exactly ``length`` tokens per depth, each with its own random key.

  The filler is cut, in whole tokens, to make the length exact; the needle goes
  in at the given fraction of the filler (0: right after the introduction).
  """
  rng = np.random.default_rng(seed)
  enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])
  intro, question = enc(INTRO), enc(QUESTION)
  filler_unit = enc(FILLER)
  rows, keys, needle_at, needle_len = [], [], [], []
  for depth in depths:
    if not 0.0 <= depth <= 1.0:
      raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(int(rng.integers(10000, 100000)))
    needle = enc(NEEDLE.format(key=key))
    room = length - len(intro) - len(question) - len(needle)
    if room < len(filler_unit):
      raise ValueError(f"a {length}-token prompt leaves no room for filler; use at least "
                       f"{length - room + len(filler_unit)} tokens")
    filler = (filler_unit * (room // len(filler_unit) + 1))[:room]
    unit = len(filler_unit)  # the needle starts at a filler sentence (except at depth 1)
    cut = room if depth == 1.0 else min(int(round(depth * room / unit)) * unit, room)
    ids = intro + filler[:cut] + needle + filler[cut:] + question
    assert len(ids) == length, (len(ids), length)
    rows.append(ids)
    keys.append(key)
    needle_at.append(len(intro) + cut)
    needle_len.append(len(needle))
  return Prompts(np.asarray(rows, np.int32), keys, list(depths), needle_at, needle_len)


def retrieved(answer: str, key: str) -> bool:
  """Returns whether the first number in ``answer`` is ``key``."""
  m = re.search(r"\d+", answer)
  return bool(m) and m.group(0) == key


def exact_match(answers: Sequence[str], keys: Sequence[str]) -> float:
  """Returns the fraction of answers that retrieve their key."""
  if len(answers) != len(keys) or not keys:
    raise ValueError(f"{len(answers)} answers for {len(keys)} keys")
  return float(np.mean([retrieved(a, k) for a, k in zip(answers, keys)]))
