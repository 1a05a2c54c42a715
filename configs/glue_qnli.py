"""GLUE QNLI, accuracy; sequence length 128 (paper Table II).

    python train.py --config=glue_qnli                      # hub data and weights
    python train.py --config=glue_qnli --config.data_dir=DIR --config.model=DIR

Should reach the paper: 90.2 accuracy at 2.3x (BERT-base, test).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.task = "qnli"
  c.max_len = 128
  c.coeff = 0.9
  return c
