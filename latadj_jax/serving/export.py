"""Export a trained workdir as a Hugging Face model directory, and optionally push it to the hub.

    python -m latadj_jax.export --workdir=workdirs/quickstart --out=exported/quickstart
    python -m latadj_jax.export --workdir=DIR --out=HF_DIR --labels=negative,positive
    python -m latadj_jax.export --workdir=DIR --out=HF_DIR --push_to_hub=USER/NAME

The directory holds ``config.json`` (with ``id2label``/``label2id`` for
classifiers), ``model.safetensors`` (torch names and layouts, float32), the
tokenizer files and a ``README.md`` model card stating the elimination profile
and the ``k`` the model was trained at. HF PyTorch loads it with
``AutoModelForSequenceClassification`` (BERT) or ``AutoModelForCausalLM``
(GPT-2) and runs it without elimination, which is our ``k = 1`` with a flat
profile; ``latadj_jax.models.from_pretrained(HF_DIR)`` loads it back, and the
profile rides along in ``config.json`` under ``"latadj"``.

The weight names come from the family's own name map, inverted
(``Family.to_torch``), so the export can never drift from the loader.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from latadj_jax.runtime import cli
from latadj_jax.runtime import workdir as wd

# HF's GLUE label names (the `datasets` features), in label-id order.
GLUE_LABELS = {
    "cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
    "qnli": ("entailment", "not_entailment"), "rte": ("entailment", "not_entailment"),
    "mnli": ("entailment", "neutral", "contradiction"), "wnli": ("not_entailment", "entailment"),
}
# HF config keys that describe the checkpoint we started from, not the exported one.
_STALE_KEYS = ("architectures", "dtype", "torch_dtype", "_name_or_path", "transformers_version",
               "_attn_implementation_autoset")


class ExportError(ValueError):
  """The workdir can't be exported; the message says why and what to do."""


def label_names(config: Any, num_labels: int, labels: Sequence[str] | None = None) -> list[str]:
  """Returns the label names: ``labels`` when given, GLUE's own names, else ``LABEL_i`` (HF's default)."""
  if labels:
    names = [str(l) for l in labels]
    if len(names) != num_labels or len(set(names)) != len(names):
      raise ExportError(f"--labels needs {num_labels} distinct names (the model has {num_labels} "
                        f"outputs), got {names}")
    return names
  glue = GLUE_LABELS.get(config.get("task", ""))
  if glue and len(glue) == num_labels:
    return list(glue)
  return [f"LABEL_{i}" for i in range(num_labels)]


def _restore(workdir: Path):
  """Returns ``(run, model, params, tokenizer, step)`` of a workdir's latest checkpoint."""
  run = wd.load_run(workdir)
  restorers = {"classifier": _restore_classifier, "lm": _restore_lm}  # by config.run
  return (run, *restorers[wd.run_kind(run.config, tuple(restorers))](workdir))


def _restore_classifier(workdir: Path) -> tuple:
  from latadj_jax.tuning import offline
  r = offline.restore(workdir)
  return r.pre.model, r.pre.params, r.tokenizer, r.step


def _restore_lm(workdir: Path) -> tuple:
  from latadj_jax.tasks import lm_eval
  r = lm_eval.restore(workdir)
  return r.model, r.params, r.tokenizer, r.step


def hf_config(run: wd.Run, model, labels: Sequence[str] | None) -> dict:
  """Returns the exported ``config.json``: the model's HF config, its class, labels and our profile."""
  cfg = {k: v for k, v in run.hf_config.items() if k not in _STALE_KEYS}
  head = model.head
  arch = model.family.hf_classes.get(head)
  if arch is None:
    raise ExportError(f"no HF class for a {cfg.get('model_type')!r} {head} model; export "
                      f"supports the heads {', '.join(model.family.hf_classes) or 'none'} of "
                      f"{cfg.get('model_type')!r}")
  cfg["architectures"] = [arch]
  num_labels = int(getattr(model.config, "num_labels", 0))
  if head == "classification":
    names = label_names(run.config, num_labels, labels)
    cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
    cfg["label2id"] = {n: i for i, n in enumerate(names)}
    cfg["problem_type"] = "regression" if num_labels == 1 else "single_label_classification"
  profile = json.loads((run.workdir / wd.PROFILE).read_text())
  cfg["latadj"] = {"train_coeff": float(run.config.coeff), "profile": list(run.profile),
                   "profile_source": str(run.config.get("profile", "")),
                   "schedules": profile.get("schedules", {}),
                   "expected_speedup": profile.get("expected_speedup", {})}
  return cfg


def model_card(run: wd.Run, cfg: dict, head: str, step: int) -> str:
  """Returns the README.md model card: what was trained, the profile, the training k and results."""
  lat = cfg["latadj"]
  base = str(run.config.get("model", "")) or "random initialisation"
  is_hub_id = base.count("/") <= 1 and not base.startswith((".", "/", "~")) and " " not in base
  task = run.config.get("task", run.config.run)
  front = ["---", "library_name: transformers",
           f"pipeline_tag: {'text-generation' if head == 'lm' else 'text-classification'}",
           "tags:", "- latency-adjustable-transformer", "- latadj-jax"]
  if run.config.get("model") and is_hub_id:
    front.append(f"base_model: {base}")
  front.append("---")
  auto = "AutoModelForCausalLM" if head == "lm" else "AutoModelForSequenceClassification"
  rows = [f"| {b} | {list(c)} | {lat['expected_speedup'].get(b, float('nan')):.2f}x |"
          for b, c in sorted(lat["schedules"].items(), key=lambda x: int(x[0]))]
  lines = front + [
      f"# {run.config.get('name', run.workdir.name)}: {cfg['architectures'][0]} trained with "
      f"word-vector elimination", "",
      f"A {cfg['model_type']} model fine-tuned with [latadj-jax](https://arxiv.org/abs/2201.03327) "
      f"(the Latency Adjustable Transformer) from `{base}` on `{task}`, exported at step {step}.", "",
      "## Elimination", "",
      f"- **Trained at k = {lat['train_coeff']:g}**: during training each layer kept only its "
      f"highest-scoring word-vectors, `N_l = max(1, floor(min(1, k * EP_l) * N_(l-1)))`.",
      f"- **Elimination profile** EP = {[round(e, 4) for e in lat['profile']]} "
      f"(`{lat['profile_source'] or 'given'}`; `flat` means EP = 1 in every layer).", ""]
  if rows:
    lines += ["Keep counts per layer at the training k, per input-length bucket, and the "
              "expected speedup (eq. 7):", "", "| bucket | keep counts | expected speedup |",
              "|---|---|---|", *rows, ""]
  lines += [
      "## Use", "",
      f"With HF transformers (`{auto}.from_pretrained(DIR)`) the model runs in full, with no "
      "elimination: that is latadj-jax at `k = 1` with a flat profile, which gives the same "
      "logits. The model was trained with elimination, so its accuracy is best checked at the k "
      "you will serve it at.", "",
      "With elimination at any k, in JAX (the profile is read from `config.json` under `latadj`):",
      "", "```python", "from latadj_jax import models, schedule",
      "pre = models.from_pretrained(DIR)",
      "counts = schedule.keep_counts(n0, k, pre.hf_config['latadj']['profile'])  # n0: input length",
      "out = pre.model.apply(pre.params, models.Batch(input_ids, attention_mask), counts)",
      "```", ""]
  lines += _results_table(run.workdir)
  return "\n".join(lines) + "\n"


def _results_table(workdir: Path) -> list[str]:
  path = workdir / "eval_results.json"
  if not path.is_file():
    return []
  rows = json.loads(path.read_text()).get("rows", [])
  metrics = [m for m in ("accuracy", "f1", "mcc", "pearson", "spearman", "perplexity",
                         "fraction_scored") if any(m in r for r in rows)]
  cols = metrics + [c for c in ("expected_speedup", "measured_speedup") if any(c in r for r in rows)]
  if not rows or not cols:
    return []
  fmt = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else str(v)
  out = ["## Results (`eval_results.json` of the workdir)", "",
         "| k | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
  out += [f"| {r.get('coeff', '')} | " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |"
          for r in rows]
  return out + [""]


def export(workdir: str | Path, out: str | Path, labels: Sequence[str] | None = None) -> Path:
  """Returns ``out`` after writing the HF directory of a workdir's latest checkpoint into it."""
  from safetensors.numpy import save_file

  from latadj_jax.models.checkpoints import CheckpointError
  workdir, out = Path(workdir).expanduser(), Path(out).expanduser()
  if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
    raise ExportError(f"{out} exists and is not an exported model directory; pick an empty --out")
  run, model, params, _, step = _restore(workdir)
  cfg = hf_config(run, model, labels)
  try:
    state = model.family.to_torch(params)
  except CheckpointError as e:
    raise ExportError(str(e)) from None
  out.mkdir(parents=True, exist_ok=True)
  save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
  wd.write_json(out / "config.json", cfg)
  for f in sorted((workdir / wd.TOKENIZER).iterdir()):
    if f.is_file():
      shutil.copy2(f, out / f.name)
  (out / "README.md").write_text(model_card(run, cfg, model.head, step))
  return out


def push_to_hub(out: Path, repo_id: str, private: bool = False) -> str:
  """Returns the URL of the hub repo after uploading ``out`` to it (created if missing)."""
  from huggingface_hub import HfApi
  api = HfApi()
  api.create_repo(repo_id, private=private, exist_ok=True)
  api.upload_folder(folder_path=str(out), repo_id=repo_id,
                    commit_message="Upload a latadj-jax export")
  return f"{api.endpoint}/{repo_id}"


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m latadj_jax.export",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a training workdir (train.py --workdir)")
  p.add_argument("--out", required=True, help="the HF model directory to write")
  p.add_argument("--labels", default="", help="comma-separated label names, in label-id order "
                 "(default: GLUE's names, else LABEL_0, LABEL_1, ...)")
  p.add_argument("--push_to_hub", default="", metavar="REPO",
                 help="also upload the directory to this hub repo (needs `huggingface-cli login`)")
  p.add_argument("--private", action="store_true", help="with --push_to_hub: a private repo")
  args = p.parse_args(argv)
  labels = [l.strip() for l in args.labels.split(",")] if args.labels else None
  out = export(args.workdir, args.out, labels)
  print(f"wrote {out}: " + ", ".join(sorted(f.name for f in out.iterdir())))
  if args.push_to_hub:
    print(f"pushed to {push_to_hub(out, args.push_to_hub, args.private)}")
  return 0


if __name__ == "__main__":
  cli.run(main)
