"""GLUE MRPC, accuracy and F1; sequence length 128 (paper Table II).

    python train.py --config=glue_mrpc                      # hub data and weights
    python train.py --config=glue_mrpc --config.data_dir=DIR --config.model=DIR

Should reach the paper: 88.0 F1 at 2.9x (BERT-base, test).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.task = "mrpc"
  c.max_len = 128
  c.coeff = 0.9
  return c
