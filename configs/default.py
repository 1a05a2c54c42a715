"""The paper's classifier run; the GLUE, IMDB and quickstart configs import it and override fields.

Follows the paper (Section IV): bert-base-uncased, AdamW, linear schedule with
warmup, dropout 0.1, cross-entropy (MSE for regression), the profile measured
from ACC before training.

    python train.py --config=default     # bert-base-uncased on GLUE SST-2 at k = 1

Not run here as such: the paper's runs are the GLUE configs (k = 0.9), whose
docstrings give the figures they should reach.
"""

import ml_collections

from configs import sections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  sections.run(c, "classifier")
  sections.model(c, "bert-base-uncased")
  sections.classifier_data(c, "sst2")
  sections.elimination(c)
  sections.survivor_rule(c)
  sections.anytime(c)
  sections.two_stage(c)
  sections.optimisation(c)
  sections.bookkeeping(c)
  return c
