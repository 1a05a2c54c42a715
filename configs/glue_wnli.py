"""GLUE WNLI, accuracy; sequence length 128 (paper Table II).

    python train.py --config=glue_wnli                      # hub data and weights
    python train.py --config=glue_wnli --config.data_dir=DIR --config.model=DIR

Should reach no paper figure; BERT-base stays at the 65% majority class.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.task = "wnli"
  c.max_len = 128
  c.coeff = 0.9
  return c
