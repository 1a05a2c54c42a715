"""GLUE RTE, accuracy; sequence length 256 (paper Table II).

    python train.py --config=glue_rte                      # hub data and weights
    python train.py --config=glue_rte --config.data_dir=DIR --config.model=DIR

Should reach the paper: 67.9 accuracy at 2.6x (BERT-base, test).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.task = "rte"
  c.max_len = 256
  c.coeff = 0.9
  return c
