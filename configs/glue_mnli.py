"""GLUE MNLI (matched dev), accuracy; sequence length 128 (paper Table II).

    python train.py --config=glue_mnli                      # hub data and weights
    python train.py --config=glue_mnli --config.data_dir=DIR --config.model=DIR

Should reach no paper figure; BERT-base reaches about 84 on matched.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.task = "mnli"
  c.max_len = 128
  c.coeff = 0.9
  return c
