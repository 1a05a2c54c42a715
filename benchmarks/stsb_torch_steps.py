"""Our STS-B training steps against HF PyTorch's on identical batches (issue 22, item 9).

    python benchmarks/stsb_torch_steps.py                 # 40 steps, dropout off, MiniLM
    python benchmarks/stsb_torch_steps.py --dropout 0.1   # with dropout (rngs differ: losses drift)
    python benchmarks/stsb_torch_steps.py --epochs 3 --dropout 0.1   # whole torch runs, dev Pearson

Both sides start from the same weights (the MiniLM checkpoint, our randomly
initialised regression head copied into torch's ``BertForSequenceClassification``),
see the same padded batches in the same order (our length buckets, shuffled as
``train.py`` shuffles them), and use the same AdamW (lr 5e-5, weight decay 0.01
off biases and LayerNorm, linear warmup 6% then linear decay, eps 1e-8). The
torch side runs twice: without gradient clipping (the optimizer ours uses) and
with ``clip_grad_norm_(1.0)``, what HF's ``Trainer`` does by default
(``max_grad_norm=1.0``). Per step: each side's loss and gradient norm. Writes
``benchmarks/results/stsb_torch_steps.json``.

With ``--epochs N`` it instead trains torch for N epochs (clip 1.0, as HF's
``Trainer``) twice, on the batches ``train.py`` makes (length buckets) and on
HF-style batches (a random permutation per epoch, each batch padded to its
longest example), and reports each run's dev Pearson/Spearman: whether the
batching explains the gap between our STS-B baseline and HF's reference run.
Writes ``benchmarks/results/stsb_torch_train.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "glue" / "STS-B"))
  p.add_argument("--total_steps", type=int, default=540, help="the schedule's length: 3 epochs")
  p.add_argument("--epochs", type=int, default=0,
                 help="> 0: whole torch runs of this many epochs, evaluated on dev")
  args = p.parse_args()

  import jax
  import optax
  import torch

  from configs import quickstart
  from latadj_jax.data import pipeline, splits
  from latadj_jax.runtime import config_lib
  from latadj_jax.training import classifier, loop, profiling

  torch.set_num_threads(2)
  config = config_lib.load("glue_stsb")
  config.update(dict(model=quickstart.minilm_dir(), data_dir=args.data_dir, learning_rate=5e-5,
                     batch_size=32, dropout=args.dropout, max_len=64, buckets=(32, 64), seed=0))
  pre, tokenizer, task = profiling.load_model_and_task(config)
  (enc,) = splits.load_encoded_split(config, task, tokenizer, "train")
  buckets = pipeline.make_buckets(config.max_len, base=tuple(config.buckets))
  if args.epochs:
    return train_runs(args, config, pre, task, tokenizer, enc, buckets)
  batches = []
  for b in pipeline.batch_iterator(enc, config.batch_size, buckets, shuffle=True, seed=0):
    batches.append(b)
    if len(batches) == args.steps:
      break

  # Ours: the train step's loss and optimizer, one device, dropout as configured.
  tx = loop.make_optimizer(config, args.total_steps)
  loss_fn = lambda params, batch, rng: (lambda s, w: s / w)(*classifier.loss_sums(
      params, batch, rng, model=pre.model, keep_counts=None, is_regression=True))

  @jax.jit
  def step(params, opt_state, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

  params, opt_state = pre.params, tx.init(pre.params)
  ours = []
  for i, b in enumerate(batches):
    params, opt_state, loss, gnorm = step(params, opt_state, b, jax.random.PRNGKey(i))
    ours.append((float(loss), float(gnorm)))

  torch_plain = torch_run(args, config, pre, batches, None)[0]
  torch_clip = torch_run(args, config, pre, batches, 1.0)[0]
  rows = [{"step": i + 1, "ours_loss": o[0], "ours_grad_norm": o[1],
           "torch_loss": t[0], "torch_grad_norm": t[1],
           "torch_clip1_loss": c[0], "torch_clip1_grad_norm": c[1]}
          for i, (o, t, c) in enumerate(zip(ours, torch_plain, torch_clip))]
  rel = max(abs(r["ours_loss"] - r["torch_loss"]) / r["torch_loss"] for r in rows)
  clipped = sum(r["torch_clip1_grad_norm"] > 1.0 for r in rows)
  result = {"benchmark": "stsb_torch_steps", "command": "python " + " ".join(sys.argv),
            "settings": vars(args), "max_rel_loss_diff_ours_vs_torch_unclipped": rel,
            "steps_where_clipping_at_1_acts": clipped, "rows": rows}
  out = REPO / "benchmarks" / "results" / "stsb_torch_steps.json"
  out.write_text(json.dumps(result, indent=2) + "\n")
  print("step  ours loss  torch loss  torch+clip loss  grad norm (ours / torch)")
  for r in rows[:10] + rows[-5:]:
    print(f"{r['step']:4d}  {r['ours_loss']:9.4f}  {r['torch_loss']:10.4f}  "
          f"{r['torch_clip1_loss']:15.4f}  {r['ours_grad_norm']:.2f} / {r['torch_grad_norm']:.2f}")
  print(f"max relative loss difference, ours vs torch unclipped: {rel:.2e}; "
        f"clipping at 1.0 acts on {clipped} of {len(rows)} steps")
  print(f"wrote {out}")


def padded_to_longest(encoded, rows) -> dict:
  """Returns one batch of ``rows`` padded to its longest example (HF's dynamic padding)."""
  from latadj_jax.data import pipeline
  return pipeline.make_batch(encoded, rows, max(len(encoded.input_ids[r]) for r in rows), len(rows))


def torch_inputs(batch: dict) -> dict:
  """Returns the batch's real (weight > 0) rows as the torch model's keyword tensors."""
  import numpy as np
  import torch
  real = batch["weights"] > 0
  return {k: torch.tensor(np.asarray(batch[k])[real], dtype=torch.long)
          for k in ("input_ids", "attention_mask", "token_type_ids")}


def torch_run(args, config, pre, batches: list[dict], clip: float | None, total_steps: int = 0):
  """Trains HF's torch model on ``batches`` from our initial weights.

  Returns the per-step (loss, gradient norm) and the model.
  """
  import numpy as np
  import torch
  import transformers
  total_steps = total_steps or args.total_steps
  torch.manual_seed(0)
  model = transformers.BertForSequenceClassification.from_pretrained(
      config.model, num_labels=1, hidden_dropout_prob=args.dropout,
      attention_probs_dropout_prob=args.dropout)
  head = pre.params["classifier"]
  with torch.no_grad():  # our head's initialisation, so both start equal
    model.classifier.weight.copy_(torch.tensor(np.asarray(head["kernel"]).T))
    model.classifier.bias.copy_(torch.tensor(np.asarray(head["bias"])))
  model.train()
  no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n
  groups = [{"params": [p for n, p in model.named_parameters() if not no_decay(n)],
             "weight_decay": 0.01},
            {"params": [p for n, p in model.named_parameters() if no_decay(n)],
             "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=5e-5, betas=(0.9, 0.999), eps=1e-8)
  warmup = int(config.warmup_ratio * total_steps)
  sched = transformers.get_linear_schedule_with_warmup(opt, max(warmup, 1), total_steps)
  out = []
  for b in batches:
    logits = model(**torch_inputs(b)).logits[:, 0]
    loss = torch.nn.functional.mse_loss(logits, torch.tensor(np.asarray(b["labels"])[b["weights"] > 0]))
    opt.zero_grad()
    loss.backward()
    gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None))
    if clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    out.append((float(loss), float(gnorm)))
  return out, model


def torch_predict(model, encoded, batch_size: int = 64):
  """Returns the torch model's outputs on every example of ``encoded``, in order."""
  import numpy as np
  import torch
  model.eval()
  out = []
  with torch.inference_mode():
    for i in range(0, len(encoded), batch_size):
      rows = np.arange(i, min(i + batch_size, len(encoded)))
      out.append(model(**torch_inputs(padded_to_longest(encoded, rows))).logits[:, 0].numpy())
  return np.concatenate(out)


def train_runs(args, config, pre, task, tokenizer, enc, buckets) -> None:
  """Whole torch runs on our bucketed batches and on HF-style batches; dev metrics of each."""
  import time
  import numpy as np
  from latadj_jax.core import metrics
  from latadj_jax.data import pipeline, splits
  (dev,) = splits.load_encoded_split(config, task, tokenizer, "validation")
  bucketed = [b for e in range(args.epochs) for b in pipeline.batch_iterator(
      enc, config.batch_size, buckets, shuffle=True, seed=0, epoch=e)]
  rng = np.random.default_rng(0)
  orders = [rng.permutation(len(enc)) for _ in range(args.epochs)]
  hf_style = [padded_to_longest(enc, order[i:i + config.batch_size])
              for order in orders for i in range(0, len(order), config.batch_size)]
  runs = {}
  for name, batches in (("our_buckets", bucketed), ("hf_random_dynamic_padding", hf_style)):
    t0 = time.perf_counter()
    losses, model = torch_run(args, config, pre, batches, 1.0, total_steps=len(batches))
    preds = torch_predict(model, dev)
    runs[name] = {"steps": len(batches), "final_train_loss": losses[-1][0],
                  "pearson": metrics.pearson(preds, dev.labels),
                  "spearman": metrics.spearman(preds, dev.labels),
                  "wall_seconds": time.perf_counter() - t0}
    print(name, json.dumps(runs[name]), flush=True)
  result = {"benchmark": "stsb_torch_train", "command": "python " + " ".join(sys.argv),
            "settings": vars(args),
            "note": "HF BertForSequenceClassification from our initial weights, AdamW as ours "
                    "(warmup 6%, weight decay 0.01 off biases/LayerNorm), grad clip 1.0, seed 0",
            "runs": runs}
  out = REPO / "benchmarks" / "results" / "stsb_torch_train.json"
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
