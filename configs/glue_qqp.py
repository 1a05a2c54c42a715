"""GLUE QQP, accuracy and F1; sequence length 128 (paper Table II).

    python train.py --config=glue_qqp                      # hub data and weights
    python train.py --config=glue_qqp --config.data_dir=DIR --config.model=DIR

Should reach no paper figure; BERT-base reaches about 71 F1 on test.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.task = "qqp"
  c.max_len = 128
  c.coeff = 0.9
  return c
