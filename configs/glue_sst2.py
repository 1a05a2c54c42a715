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
  c.num_epochs = 1         # 67,349 sentences: one epoch is stage 1's flat baseline (README)
  c.stage2.num_epochs = 1
  return c
