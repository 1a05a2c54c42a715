"""KV-cache generation for Llama-family models: ``gpt2_generate``'s, which serves any causal LM.

The prompt is prefilled with elimination; layer ``l``'s cache then holds the
keys (already rotated) and values of the ``N_{l-1}`` word-vectors it attended
over, plus ``max_new_tokens`` empty slots. A new token gets the causal
position ``p_last + 1 + t`` and the RoPE position id ``n_valid + t`` (HF's
rule for left- and right-padded prompts alike), so the cached survivors keep
the rotations of their original positions and the new tokens continue after
them. ``gpt2_generate`` jits with ``llama.jit_options`` (Eigen's dots on CPU)
and bounds the prompt by ``max_position_embeddings`` (the config's
``n_positions``). This module keeps the Llama callers' import path.
"""

from __future__ import annotations

# Re-exported: the names Llama callers (tests, benchmarks) use.
from latadj_jax.models.gpt2_generate import decode_fn as decode_fn
from latadj_jax.models.gpt2_generate import generate as generate
from latadj_jax.models.gpt2_generate import init_caches as init_caches
from latadj_jax.models.gpt2_generate import prefill_fn as prefill_fn
from latadj_jax.models.gpt2_generate import prefill_state as prefill_state
from latadj_jax.models.gpt2_generate import select_token as select_token
