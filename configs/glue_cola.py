"""GLUE CoLA, Matthews correlation; sequence length 64 (paper Table II).

    python train.py --config=glue_cola                      # hub data and weights
    python train.py --config=glue_cola --config.data_dir=DIR --config.model=DIR

Should reach the paper: 53.4 MCC at 3.8x (BERT-base, test).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.task = "cola"
  c.max_len = 64
  c.coeff = 0.9
  return c
