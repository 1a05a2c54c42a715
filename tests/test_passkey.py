"""tasks/passkey.py: passkey prompts of an exact length, the key at its depth (issue 24)."""

import pytest

from latadj_jax.data import text
from latadj_jax.tasks import passkey


def test_passkey_prompts_have_the_exact_length_and_the_key_at_its_depth():
  tok = text.byte_tokenizer()
  p = passkey.make(tok, 900, [0.0, 0.5, 1.0], seed=3)
  assert p.input_ids.shape == (3, 900)
  assert len(set(p.keys)) == 3
  for ids, key, at, depth in zip(p.input_ids, p.keys, p.needle_positions, p.depths):
    prompt = tok.decode(ids.tolist())
    assert prompt.startswith(passkey.INTRO) and prompt.endswith(passkey.QUESTION)
    assert tok.decode(ids[at:].tolist()).startswith(passkey.NEEDLE.format(key=key))
  intro, question = (len(tok(s, add_special_tokens=False)["input_ids"])
                     for s in (passkey.INTRO, passkey.QUESTION))
  needle = len(tok(passkey.NEEDLE.format(key=p.keys[2]), add_special_tokens=False)["input_ids"])
  # Depth 0: right after the introduction; 1: right before the question; 0.5: mid-filler.
  assert p.needle_positions[0] == intro and p.needle_positions[2] == 900 - question - needle
  assert p.needle_lengths[2] == needle
  room = 900 - intro - question - needle
  unit = len(tok(passkey.FILLER, add_special_tokens=False)["input_ids"])
  assert abs(p.needle_positions[1] - intro - 0.5 * room) <= unit / 2
  with pytest.raises(ValueError, match="no room for filler"):
    passkey.make(tok, 200, [0.5])
  assert passkey.retrieved(" 52817. Remember", "52817")
  assert not passkey.retrieved(" 5281 or 52817", "52817") and not passkey.retrieved(" none", "1")
  assert passkey.exact_match([" 12345.", " 99"], ["12345", "54321"]) == 0.5
