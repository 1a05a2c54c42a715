"""Flan-T5-base, MMLU 5-shot direct answers, no training: the paper's Table VI setting.

    python eval.py --config=flan_t5_mmlu --coeff 1.0,0.9,0.8          # hub data and weights
    python eval.py --config=flan_t5_mmlu --config.model=DIR \\
        --config.data_dir=../shared/data/fewshot --coeff 0.9 --out DIR   # local files

The flat profile (R_l = k) and greedy generation; the answer letter is scored
by exact match. Should reach the paper's numbers with the real weights and the
hub's MMLU test set: 34.05 at 1x, 34.13 at 1.83x (k = 0.90), 32.24 at 2.94x
(k = 0.80). Not yet run here: no T5 weights can be downloaded on this machine.
With local files (``mmlu_cot_prompts.json``: about 5 dev questions per
subject) each question is scored against the other questions of its subject
as shots, so it is at most 4-shot; the results file states the protocol.
"""

import ml_collections

from configs import sections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  sections.run(c, "fewshot")
  sections.model(c, "google/flan-t5-base")   # or a local T5 directory (config.json + weights + tokenizer)
  sections.fewshot(c, "mmlu")
  c.max_new_tokens = 5             # greedy tokens per prompt; 0: the longest target's + 1
  # The sweep over k (``--coeff`` overrides), and the profile: "flat" (R_l = k, the paper's
  # training-free setting), "acc" (measured on the prompts), "v1,...".
  sections.sweep(c, coeffs=(1.0, 0.9, 0.8), time_repeats=5)
  sections.profile(c, "flat", batches=4)
  return c
