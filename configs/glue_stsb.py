"""GLUE STS-B, Pearson and Spearman (regression, MSE loss); sequence length 64 (paper Table II).

    python train.py --config=glue_stsb                      # hub data and weights
    python train.py --config=glue_stsb --config.data_dir=DIR --config.model=DIR

Should reach the paper: 84.2 Pearson at 2.3x (BERT-base, test).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.task = "stsb"
  c.max_len = 64
  c.coeff = 0.9
  return c
