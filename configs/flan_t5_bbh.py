"""Flan-T5-base, BIG-Bench Hard 3-shot direct answers, no training.

    python eval.py --config=flan_t5_bbh --coeff 1.0,0.9,0.8           # hub data and weights
    python eval.py --config=flan_t5_bbh --config.model=DIR \\
        --config.data_dir=../shared/data/fewshot --coeff 0.9 --out DIR   # local files

The target is scored by exact match on the generation up to a blank line or
"Q:". The paper reports no BBH numbers, and none have been measured here with
real weights (none can be downloaded on this machine). With only lm-eval's task
YAMLs locally (3 exemplars per task, no eval set), each exemplar is scored with
the task's other two as shots; a BIG-Bench-Hard ``<task>.json`` beside the
YAMLs is scored 3-shot instead. The results file states the protocol.
"""

from configs import flan_t5_mmlu


def get_config():
  c = flan_t5_mmlu.get_config()
  c.benchmark = "bbh"
  c.num_shots = 3
  c.max_new_tokens = 0             # BBH targets run from "Yes" to a sorted word list
  return c
