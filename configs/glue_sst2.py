"""GLUE SST-2, accuracy; sequence length 64 (paper Table II).

    python train.py --config=glue_sst2                      # hub data and weights
    python train.py --config=glue_sst2 --config.data_dir=DIR --config.model=DIR

Should reach the paper: 92.6 accuracy at 2.4x; baseline 93.5 (BERT-base, test).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.task = "sst2"
  c.max_len = 64
  c.coeff = 0.9
  return c
