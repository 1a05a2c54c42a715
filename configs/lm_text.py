"""A tiny GPT-2 trained from scratch on local text (default: Macbeth, shipped in the package), on a CPU in minutes.

    python train.py --config=lm_text --workdir=workdirs/lm_text
    python eval.py --workdir=workdirs/lm_text --coeff 0.8,0.85,0.9,0.95,1.0
    python train.py --config=lm_text --config.data_dir=DIR_OF_TXT   # any directory of .txt files

No GPT-2 weights or tokenizer can be downloaded here, so the model is a random
4-layer, 128-wide GPT-2 and the tokenizer is byte-level (token = UTF-8 byte,
plus EOS between files). Each file's last 10% of lines is held out. The default
text is ``latadj_jax/data/sample_text/macbeth.txt`` (public domain, 103 KB), so
the command runs from a clone with nothing else; the README's figures used four
plays (``--config.data_dir=DIR``). A random model has no meaningful ACC curve,
so the profile is flat (``R_l = k``) and training runs with elimination at
k = 0.9, the loss on the survivors only.
This shows the pipeline end to end, not quality: see
``benchmarks/results/lm_shakespeare.json`` for the held-out perplexity (per
byte) it reaches at each k.
"""

import ml_collections

from configs import assets, lm_wikitext103


def get_config():
  c = lm_wikitext103.get_config()
  c.model = ""
  c.tokenizer = "byte"
  c.gpt2 = ml_collections.ConfigDict(dict(n_layer=4, n_embd=128, n_head=4, n_positions=256))
  c.data_source = "local"
  c.data_dir = str(assets.SAMPLE_TEXT)   # shipped in the package; any directory of .txt files works
  c.hub_dataset = ""
  c.hub_config = ""
  c.block_size = 128
  c.max_len = 128
  c.dropout = 0.0                   # minutes of training underfit; dropout would only slow it
  c.batch_size = 16
  c.eval_batch_size = 32
  c.learning_rate = 1e-3            # from scratch, not fine-tuning
  c.warmup_ratio = 0.05
  c.num_epochs = 1
  c.coeff = 0.9
  c.profile = "flat"
  c.eval_coeffs = (0.8, 0.85, 0.9, 0.95, 1.0)
  c.time_repeats = 5
  c.log_every = 20
  c.checkpoint_every = 100
  return c
