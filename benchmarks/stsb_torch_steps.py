"""Our STS-B training steps against HF PyTorch's on identical batches (issue 22, item 9).

    python benchmarks/stsb_torch_steps.py                 # 40 steps, dropout off, MiniLM
    python benchmarks/stsb_torch_steps.py --dropout 0.1   # with dropout (rngs differ: losses drift)

Both sides start from the same weights (the MiniLM checkpoint, our randomly
initialised regression head copied into torch's ``BertForSequenceClassification``),
see the same padded batches in the same order (our length buckets, shuffled as
``train.py`` shuffles them), and use the same AdamW (lr 5e-5, weight decay 0.01
off biases and LayerNorm, linear warmup 6% then linear decay, eps 1e-8). The
torch side runs twice: without gradient clipping (the optimizer ours uses) and
with ``clip_grad_norm_(1.0)``, what HF's ``Trainer`` does by default
(``max_grad_norm=1.0``). Per step: each side's loss and gradient norm. Writes
``benchmarks/results/stsb_torch_steps.json``.
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
  args = p.parse_args()

  import jax
  import numpy as np
  import optax
  import torch
  import transformers

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
  batches = []
  for b in pipeline.batch_iterator(enc, config.batch_size, buckets, shuffle=True, seed=0):
    batches.append(b)
    if len(batches) == args.steps:
      break

  # Ours: the train step's loss and optimizer, one device, dropout as configured.
  tx = loop.make_optimizer(config, args.total_steps)
  loss_fn = lambda params, batch, rng: (lambda s, w: s / w)(*classifier.loss_sums(
      params, batch, rng, module=pre.module, keep_counts=None, is_regression=True))

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

  def torch_run(clip: float | None) -> list[tuple[float, float]]:
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
    warmup = int(config.warmup_ratio * args.total_steps)
    sched = transformers.get_linear_schedule_with_warmup(opt, max(warmup, 1), args.total_steps)
    out = []
    for b in batches:
      real = b["weights"] > 0
      t = lambda k: torch.tensor(np.asarray(b[k])[real], dtype=torch.long)
      logits = model(input_ids=t("input_ids"), attention_mask=t("attention_mask"),
                     token_type_ids=t("token_type_ids")).logits[:, 0]
      loss = torch.nn.functional.mse_loss(logits, torch.tensor(np.asarray(b["labels"])[real]))
      opt.zero_grad()
      loss.backward()
      gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None))
      if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
      opt.step()
      sched.step()
      out.append((float(loss), float(gnorm)))
    return out

  torch_plain, torch_clip = torch_run(None), torch_run(1.0)
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


if __name__ == "__main__":
  main()
