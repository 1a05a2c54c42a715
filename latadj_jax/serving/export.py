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

The weight names come from inverting each family's torch name map: a Flax path
``a/b/kernel`` becomes ``a.b.weight``, and the family's own map must send that
name back to the same path (it also says whether to transpose), so the export
can never drift from the loader.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from flax import traverse_util

from latadj_jax.runtime import cli
from latadj_jax.runtime import workdir as wd

# The HF class that loads each (family, head), as written into config.json "architectures".
ARCHITECTURES = {("bert", "classification"): "BertForSequenceClassification",
                 ("gpt2", "lm"): "GPT2LMHeadModel"}
# HF's GLUE label names (the `datasets` features), in label-id order.
GLUE_LABELS = {
    "cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
    "qnli": ("entailment", "not_entailment"), "rte": ("entailment", "not_entailment"),
    "mnli": ("entailment", "neutral", "contradiction"), "wnli": ("not_entailment", "entailment"),
}
# Flax leaf name -> torch leaf name; the family's name map decides the transpose.
_TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight"}
# HF config keys that describe the checkpoint we started from, not the exported one.
_STALE_KEYS = ("architectures", "dtype", "torch_dtype", "_name_or_path", "transformers_version",
               "_attn_implementation_autoset")


class ExportError(ValueError):
  """The workdir can't be exported; the message says why and what to do."""


def torch_state(params: Any, name_map: Callable[[str], Any]) -> dict[str, np.ndarray]:
  """Returns the float32 torch-layout tensors of ``params`` by torch name, via the inverted name map.

  Raises ExportError when the family's map does not send a generated name back
  to the parameter it came from (a family whose names this rule can't invert).
  """
  out = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    name = ".".join(path[:-1] + (_TORCH_LEAF.get(path[-1], path[-1]),))
    mapped = name_map(name)
    if mapped is None or tuple(mapped[0]) != tuple(path):
      raise ExportError(f"can't export parameter {'/'.join(path)}: its torch name {name!r} maps "
                        f"back to {mapped and '/'.join(mapped[0])!r}; this family's name map "
                        f"needs an explicit inverse")
    array = np.asarray(value, dtype=np.float32)
    out[name] = np.ascontiguousarray(array.T if mapped[1] else array)
  return out


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
  """Returns ``(run, module, params, tokenizer, head, step)`` of a workdir's latest checkpoint."""
  run = wd.load_run(workdir)
  if run.config.get("task") == "lm":
    from latadj_jax.tasks import lm_eval
    r = lm_eval.restore(workdir)
    return run, r.module, r.params, r.tokenizer, "lm", r.step
  from latadj_jax.tuning import offline
  r = offline.restore(workdir)
  return run, r.pre.module, r.pre.params, r.tokenizer, "classification", r.step


def hf_config(run: wd.Run, head: str, labels: Sequence[str] | None, num_labels: int) -> dict:
  """Returns the exported ``config.json``: the model's HF config, its class, labels and our profile."""
  cfg = {k: v for k, v in run.hf_config.items() if k not in _STALE_KEYS}
  arch = ARCHITECTURES.get((cfg.get("model_type"), head))
  if arch is None:
    raise ExportError(f"no HF class for a {cfg.get('model_type')!r} {head} model; export "
                      f"supports {', '.join(f'{t} {h}' for t, h in ARCHITECTURES)}")
  cfg["architectures"] = [arch]
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
  task = run.config.get("task", "")
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
      "out = pre.module.apply({'params': pre.params}, input_ids, attention_mask, keep_counts=counts)",
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

  from latadj_jax import models
  workdir, out = Path(workdir).expanduser(), Path(out).expanduser()
  if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
    raise ExportError(f"{out} exists and is not an exported model directory; pick an empty --out")
  run, module, params, _, head, step = _restore(workdir)
  num_labels = int(getattr(module.config, "num_labels", 0))
  cfg = hf_config(run, head, labels, num_labels)
  state = torch_state(params, models.family(cfg).torch_name_map)
  out.mkdir(parents=True, exist_ok=True)
  save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
  wd.write_json(out / "config.json", cfg)
  for f in sorted((workdir / wd.TOKENIZER).iterdir()):
    if f.is_file():
      shutil.copy2(f, out / f.name)
  (out / "README.md").write_text(model_card(run, cfg, head, step))
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
