"""Defaults shared by every run; task configs import this and override fields.

Follows the paper (Section IV): bert-base-uncased, AdamW, linear schedule with
warmup, dropout 0.1, cross-entropy (MSE for regression), the profile measured
from ACC before training.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Model: an HF hub id or a local directory (config.json + weights + tokenizer).
  c.model = "bert-base-uncased"
  c.dtype = "float32"
  c.dropout = 0.1
  # Data: a GLUE task name or "text_classification"; source auto|hub|local|tfds.
  c.task = "sst2"
  c.num_labels = 0                 # 0: from the task
  c.data_source = "auto"
  c.data_dir = ""                  # a local GLUE dir (TSV or HF parquet layout), or CSV/JSONL
  c.hub_dataset = ""               # for text_classification from the hub, e.g. "stanfordnlp/imdb"
  c.dev_fraction = 0.1             # split a single local file into train/validation
  c.max_len = 128
  c.buckets = (32, 64, 128, 256, 512)   # candidate lengths; capped at max_len
  c.max_train_examples = 0         # 0: all
  c.max_eval_examples = 0
  # Elimination: coeff k, and the profile: "acc" (measure), "flat", or "0.9,0.8,...";
  # "" measures too, but a run with init_from keeps that workdir's profile.
  c.coeff = 1.0
  c.profile = ""
  c.profile_batches = 8
  c.profile_degree = 2
  # Which word-vectors survive at the keep counts: "score" (the method), or the
  # Table VII ablations "first" (no sort) and "random".
  c.survivors = "score"
  # Causal LMs (GPT-2, Llama family) add "window": eq. 8 over the last ``score_window``
  # queries (SnapKV's observation window); the first ``keep_sinks`` and the last
  # ``keep_recent`` tokens always survive (StreamingLLM's sinks and recent window).
  c.score_window = 32
  c.keep_sinks = 0
  c.keep_recent = 0
  c.score_pool = 0                 # score/window: max-pool the scores over this many neighbours
  # Anytime training (latadj_jax/anytime.py): e.g. "0.8,0.9,1.0,1.1,1.2" trains one
  # model for every k in the range; empty trains at ``coeff`` alone.
  c.train_coeffs = ""
  # The teacher pass: "full" (live model, no elimination, on the labels: LAT; the best of the
  # three on SST-2, README), "frozen" (the init_from model, frozen, forward only: DynaBERT/OFA)
  # or "largest" (largest k's schedule).
  c.teacher = "full"
  # Students trained every step besides the smallest: "auto" is k = 1 when it is among
  # train_coeffs (the k users pick most), "" none, or a list such as "0.9,1.0".
  c.anytime_always = "auto"
  c.anytime_samples = 2            # further students drawn per step from the other coefficients
  c.student_dropout = True         # False: dropout on the teacher pass only
  c.distill_temperature = 1.0
  c.distill_weight = 1.0           # each student's distillation loss
  c.student_label_weight = 0.0     # each student's label loss
  # Two stages: start from a fine-tuned workdir's chosen checkpoint (and its profile).
  c.init_from = ""
  # Checkpoint choice: evaluate at each of these k and keep the parameters with the best mean
  # of the first task metric (workdir/best, best.json; eval.py takes them). Empty: the last.
  c.select_coeffs = ""
  c.eval_every = 0                 # > 0: also evaluate every this many steps
  # Optimisation.
  c.batch_size = 32
  c.eval_batch_size = 64
  c.learning_rate = 2e-5
  c.weight_decay = 0.01
  c.warmup_ratio = 0.06
  c.max_grad_norm = 0.0            # > 0: clip the gradient's global norm (HF Trainer: 1.0)
  c.num_epochs = 3
  c.max_steps = -1                 # > 0 stops early
  c.seed = 0
  # Bookkeeping.
  c.log_every = 20
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.eval_every_epoch = True
  c.eval_coeffs = ()               # after training, evaluate at these coefficients
  c.time_repeats = 10              # timed runs per coefficient in a sweep (median)
  c.progress = True
  # JAX's persistent compilation cache, shared by every run: "default" is
  # $LATADJ_XLA_CACHE or ~/.cache/latadj_jax/xla; "" turns it off.
  c.compilation_cache = "default"
  return c
