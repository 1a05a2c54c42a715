"""The causal LM head shared by the decoder families (GPT-2, Llama): logits, prefill and decode.

A family's LM model subclasses ``CausalLM`` and names its body: the body class,
the body's scope (HF's: ``transformer`` for GPT-2, ``model`` for Llama, which
is also the family's ``BASE_PREFIX``) and the body's token embedding, which a
tied head reuses. The body must take GPT-2's ``__call__`` arguments (plus
``output_kv``) and have ``decode(token_B, caches, slot_offsets, pos_B,
pos_id_B)``; the config must have ``vocab_size``, ``tie_word_embeddings``,
``initializer_range`` and ``dtype``. Generation on top of ``prefill`` and
``decode`` is ``gpt2_generate``'s, for either family.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from latadj_jax.core import elimination


def jit_options(module: Any) -> dict[str, Any]:
  """Returns ``jax.jit`` keyword arguments for a module: its family's CPU compiler options on CPU.

  A family that needs other XLA:CPU options sets ``CPU_COMPILER_OPTIONS`` on its
  module classes (Llama does: see ``llama.CPU_COMPILER_OPTIONS``); any other
  module, or another backend, gets none.
  """
  options = getattr(module, "CPU_COMPILER_OPTIONS", None)
  if options is not None and jax.default_backend() == "cpu":
    return {"compiler_options": options}
  return {}


class CausalLM(nn.Module):
  """A family's body plus the LM head (``lm_head``, or tied to the body's embedding)."""
  config: Any
  # Set by each family (class attributes, not dataclass fields: they are unannotated): its body
  # class, the body's scope name (as in HF's checkpoints) and the name of the body's token
  # embedding (an ``nn.Embed``), which a tied head attends with.
  BODY = None
  BODY_SCOPE = ""
  EMBEDDING = ""
  CPU_COMPILER_OPTIONS = None

  def setup(self):
    cfg = self.config
    # setattr, so the body's parameters sit under the family's own scope name.
    setattr(self, self.BODY_SCOPE, self.BODY(cfg))
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                              kernel_init=nn.initializers.normal(cfg.initializer_range))

  def body(self) -> nn.Module:
    """Returns the family's body (``transformer``, ``model``, ...)."""
    return getattr(self, self.BODY_SCOPE)

  def head(self, h_BxND):
    """Returns float32 logits for hidden states after the body's final norm."""
    if self.config.tie_word_embeddings:
      return getattr(self.body(), self.EMBEDDING).attend(h_BxND).astype(jnp.float32)
    return self.lm_head(h_BxND).astype(jnp.float32)

  def __call__(self, input_ids, attention_mask=None, keep_counts: Sequence[int] | None = None,
               deterministic: bool = True, output_scores: bool = False,
               output_hidden_states: bool = False, inputs_embeds=None, position_ids=None):
    """Returns the body's dict plus ``logits`` [B, N_L, V] at the surviving positions."""
    out = self.body()(input_ids, attention_mask, keep_counts, deterministic, output_scores,
                      output_hidden_states, inputs_embeds, position_ids)
    out["logits"] = self.head(out["last_hidden_state"])
    return out

  def prefill(self, input_ids, attention_mask, keep_counts: Sequence[int] | None = None):
    """Returns (logits_BxV at each row's last valid token, body dict with per-layer ``kv``).

    Only the last token's logits are computed: that is all the first new
    token needs, and the LM head over every position would dominate the cost.
    """
    out = self.body()(input_ids, attention_mask, keep_counts, output_kv=True)
    last_BxK = elimination.last_valid_mask(out["mask"])
    h_BxD = jnp.einsum("bk,bkd->bd", last_BxK.astype(out["last_hidden_state"].dtype),
                       out["last_hidden_state"])
    return self.head(h_BxD), out

  def decode(self, token_B, caches, slot_offsets, pos_B, pos_id_B):
    """Returns (logits_BxV, caches) for one new token per row.

    ``pos_B`` is its causal (original) position, ``pos_id_B`` its position id
    (GPT-2's position embedding, Llama's RoPE position).
    """
    h_BxD, caches = self.body().decode(token_B, caches, slot_offsets, pos_B, pos_id_B)
    return self.head(h_BxD), caches
