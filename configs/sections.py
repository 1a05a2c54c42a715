"""Sections of run-config fields: each function adds one group of fields, with its defaults, to a ConfigDict.

A config holds the fields its run reads: it composes the sections that run needs,
then overrides fields. Which run reads which section:

  classifier training (train.py; training.classifier, loop, anytime, profiling):
      model, classifier_data, elimination, survivor_rule, anytime, two_stage, recipe,
      optimisation, bookkeeping                                      (configs/default.py)
  causal-LM training (train.py, run "lm"; training.lm, loop, anytime, profiling):
      model, text_data, lambada, elimination, causal_survivor_rules, anytime,
      optimisation, bookkeeping                                      (configs/lm_wikitext103.py)
  few-shot T5 and few-shot causal LM (eval.py --config; tasks.fewshot, tasks.fewshot_lm):
      model, fewshot, sweep (+ profile for T5)                       (configs/flan_t5_mmlu.py)
  continuation NLL (eval.py --config; tasks.continuation):
      model, profile, causal_survivor_rules, sweep                   (configs/smollm2_text.py)

A trained workdir stores its config (``config.json``); ``eval.py --workdir`` and the
server read that copy, so what they read is in the training sections.
"""

import ml_collections


RUNS = ("classifier", "lm", "continuation", "fewshot", "fewshot_lm")


def run(c: ml_collections.ConfigDict, kind: str) -> None:
  """Adds the kind of run (one of RUNS): what train.py and eval.py do with the config."""
  assert kind in RUNS, kind
  c.run = kind


def model(c: ml_collections.ConfigDict, name: str) -> None:
  """Adds the weights and the dtype they run in."""
  c.model = name                   # an HF hub id, a local directory (config.json + weights), or a .gguf
  c.dtype = "float32"


def classifier_data(c: ml_collections.ConfigDict, task: str) -> None:
  """Adds a classifier's data: a GLUE task name or "text_classification", its source and lengths."""
  c.task = task
  c.num_labels = 0                 # 0: from the task
  c.data_source = "auto"           # auto|hub|local|tfds
  c.data_dir = ""                  # a local GLUE dir (TSV or HF parquet layout), or CSV/JSONL
  c.hub_dataset = ""               # for text_classification from the hub, e.g. "stanfordnlp/imdb"
  c.dev_fraction = 0.1             # split a single local file into train/validation
  c.max_len = 128
  c.buckets = (32, 64, 128, 256, 512)   # candidate lengths; capped at max_len
  c.max_train_examples = 0         # 0: all
  c.max_eval_examples = 0


def text_data(c: ml_collections.ConfigDict) -> None:
  """Adds a causal LM's text: its tokenizer, source and next-token blocks."""
  c.tokenizer = "model"            # "model" (the weights' own), "byte", or a tokenizer path/id
  c.data_source = "auto"           # local when data_dir is set, else the hub
  c.data_dir = ""                  # a directory of .txt files, or one .txt file
  c.hub_dataset = ""
  c.hub_config = ""
  c.dev_fraction = 0.1             # each local file's last lines held out
  c.block_size = 1024
  c.max_train_examples = 0         # blocks; 0: all
  c.max_eval_examples = 0


def lambada(c: ml_collections.ConfigDict) -> None:
  """Adds the last-word evaluation after LM training (and eval.py --workdir on its workdir)."""
  c.lambada = ""                   # a JSONL of {"text": ...}, or a hub id, e.g. EleutherAI/lambada_openai
  c.buckets = (32, 64, 128, 256, 512)   # passage length buckets; capped at the longest passage


def profile(c: ml_collections.ConfigDict, spec: str = "", batches: int = 8) -> None:
  """Adds the elimination profile: "acc" (measure ACC), "flat" (R_l = k), "step<l>@<f>" or "v1,...,vL"."""
  c.profile = spec
  c.profile_batches = batches      # batches ACC is measured on
  c.profile_degree = 2             # the polynomial fitted to ACC


def elimination(c: ml_collections.ConfigDict) -> None:
  """Adds training-time elimination: the coefficient k and the profile.

  ``profile=""`` measures ACC too, but a run with ``init_from`` keeps that workdir's profile.
  """
  c.coeff = 1.0
  profile(c, "", batches=8)


def survivor_rule(c: ml_collections.ConfigDict) -> None:
  """Adds which word-vectors survive at the keep counts: "score" (the method), or Table VII's "first", "random"."""
  c.survivors = "score"


def causal_survivor_rules(c: ml_collections.ConfigDict) -> None:
  """Adds the survivor rules of causal LMs (GPT-2, Llama family).

  Besides score/first/random: "window" (eq. 8 over the last ``score_window`` queries,
  SnapKV's observation window) and "last" (the most recent tokens); the first
  ``keep_sinks`` and the last ``keep_recent`` tokens always survive (StreamingLLM's
  sinks and recent window).
  """
  survivor_rule(c)
  c.score_window = 32              # window: the last this many queries score the tokens
  c.keep_sinks = 0                 # the first this many tokens always survive
  c.keep_recent = 0                # the last this many tokens always survive
  c.score_pool = 0                 # score/window: max-pool the scores over this many neighbours


def anytime(c: ml_collections.ConfigDict) -> None:
  """Adds anytime training (latadj_jax/training/anytime.py): one model for every k of a range."""
  c.train_coeffs = ""              # e.g. "0.8,0.9,1.0,1.1,1.2"; empty trains at ``coeff`` alone
  # The teacher pass: "full" (live model, no elimination, on the labels: LAT; the best of the
  # three on SST-2, README), "frozen" (the init_from model, frozen, forward only: DynaBERT/OFA)
  # or "largest" (largest k's schedule).
  c.teacher = "full"
  # Students trained every step besides the smallest: "auto" is k = 1 when it is among
  # train_coeffs (the k users pick most), "" none, or a list such as "0.9,1.0".
  c.anytime_always = "auto"
  c.anytime_samples = 2            # further students drawn per step from the other coefficients
  c.student_dropout = True         # False: dropout on the teacher pass only
  # What the students match: "logits" (the teacher's outputs), "hidden" (its hidden states at
  # the student's survivors, plus position 0's final state; teacher full or frozen) or "none"
  # (the labels alone, at student_label_weight).
  c.distill = "logits"
  c.distill_temperature = 1.0
  c.distill_weight = 1.0           # each student's logit distillation loss
  c.hidden_weight = 1.0            # each student's hidden-state loss (distill "hidden")
  c.student_label_weight = 0.0     # each student's label loss


def two_stage(c: ml_collections.ConfigDict) -> None:
  """Adds a classifier's second stage: its starting workdir, and the k that choose the kept checkpoint."""
  # Start from a fine-tuned workdir's chosen checkpoint (and its profile).
  c.init_from = ""
  # Evaluate at each of these k and keep the parameters with the best mean of the first task
  # metric (workdir/best, best.json; eval.py takes them). Empty: the last.
  c.select_coeffs = ""


def recipe(c: ml_collections.ConfigDict) -> None:
  """Adds what train.py runs (latadj_jax/training/recipe.py): two stages into one workdir, or one.

  "two_stage": WORKDIR/stage1 fine-tunes without elimination, then WORKDIR trains one model
  for every k from it, with the config's fields overridden by ``stage2`` (the anytime
  fields, teacher, distill and the rest, apply to stage 2 alone). "single": one run, the
  config's fields as given (``--config.train_coeffs`` for anytime in one stage).
  """
  c.recipe = "two_stage"
  c.stage2 = ml_collections.ConfigDict(dict(
      train_coeffs="0.6,0.7,0.8,0.9,1.0",  # the students' flat k; k = 1 trained every step
      profile="flat",                       # flat: equal k means R_l = k at every layer
      num_epochs=2,
      learning_rate=5e-5,
      warmup_steps=-1,                      # -1: warmup_ratio
      # The kept checkpoint: best mean dev metric over this k grid, evaluated every eval_every steps.
      select_coeffs="0.6,0.65,0.7,0.75,0.8,0.85,0.9,0.95,1.0",
      eval_every=500,
  ))


def optimisation(c: ml_collections.ConfigDict) -> None:
  """Adds the optimiser: AdamW, linear schedule with warmup, dropout 0.1 (the paper's Section IV)."""
  c.dropout = 0.1
  c.batch_size = 32
  c.eval_batch_size = 64
  c.learning_rate = 2e-5
  c.weight_decay = 0.01
  c.warmup_ratio = 0.06
  c.warmup_steps = -1              # >= 0: this many warm-up steps instead of warmup_ratio
  c.max_grad_norm = 0.0            # > 0: clip the gradient's global norm (HF Trainer: 1.0)
  c.num_epochs = 3
  c.max_steps = -1                 # > 0 stops early
  c.seed = 0


def bookkeeping(c: ml_collections.ConfigDict) -> None:
  """Adds the training loop's logging, checkpoints, evaluations and the final sweep over k."""
  c.log_every = 20
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.eval_every = 0                 # > 0: also evaluate every this many steps
  c.eval_every_epoch = True
  c.eval_coeffs = ()               # after training, evaluate at these coefficients
  c.time_repeats = 10              # timed runs per coefficient in a sweep (median)
  c.progress = True
  # JAX's persistent compilation cache, shared by every run: "default" is
  # $LATADJ_XLA_CACHE or ~/.cache/latadj_jax/xla; "" turns it off.
  c.compilation_cache = "default"


def fewshot(c: ml_collections.ConfigDict, benchmark: str) -> None:
  """Adds a few-shot benchmark (mmlu|bbh), its source and the prompts' static shapes."""
  c.benchmark = benchmark
  c.data_source = "auto"           # auto|hub|local (auto: local when data_dir is set)
  c.data_dir = ""                  # a dir with mmlu_cot_prompts.json (or the file), or bbh/*.yaml
  c.tasks = ()                     # empty: all; or --config.tasks="'anatomy','virology'"
  c.num_shots = 5                  # a prompt over max_len drops its last shots first
  c.max_items = 0                  # > 0: evaluate only this many, round-robin over tasks
  c.max_len = 512
  c.buckets = (128, 256, 512)      # prompt length buckets (static shapes); capped at max_len
  c.batch_size = 8


def sweep(c: ml_collections.ConfigDict, coeffs: tuple[float, ...], time_repeats: int) -> None:
  """Adds a training-free sweep over k (``eval.py --coeff`` overrides) and where its results go."""
  c.coeffs = coeffs
  c.time_repeats = time_repeats    # interleaved timed runs per schedule (median)
  c.workdir = ""                   # results dir; default workdirs/<config name>
