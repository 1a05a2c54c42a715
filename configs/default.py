"""The classifier run; the GLUE, IMDB and quickstart configs import it and override fields.

Follows the paper (Section IV): bert-base-uncased, AdamW, linear schedule with
warmup, dropout 0.1, cross-entropy (MSE for regression). Then the two-stage
recipe (``configs/sections.py: recipe``): fine-tune without elimination into
``WORKDIR/stage1``, then train one model for every k into ``WORKDIR``.

    python train.py --config=default     # bert-base-uncased on GLUE SST-2
    python train.py --config=default --config.recipe=single   # one run at k = 1, the ACC profile

Not run here as such: the GLUE configs are, whose docstrings give the figures
they should reach.
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
  sections.recipe(c)
  sections.optimisation(c)
  # The settings of the runs the README measures (HF run_glue's): lr 5e-5, clipping at 1.0.
  c.learning_rate = 5e-5
  c.max_grad_norm = 1.0
  sections.bookkeeping(c)
  return c
