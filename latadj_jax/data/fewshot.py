"""Few-shot MMLU and BBH: readers, direct k-shot prompts, answer extraction and exact match.

The harness that runs a model over them is ``latadj_jax.tasks.fewshot``. Data comes
from the HF hub or from local files:

* MMLU, hub (``cais/mmlu``): the 5 ``dev`` questions of a subject are the
  shots, its ``test`` questions are evaluated.
* MMLU, local (``mmlu_cot_prompts.json``: one chain-of-thought prompt of about
  5 dev questions with answers per subject): each question is evaluated once,
  with the other questions of its subject as shots, so at most ``n - 1`` (4)
  shots. The chain of thought is dropped; only question, options and letter stay.
* BBH, local (lm-eval's ``bbh/<task>.yaml``, 3 exemplars each): when a
  BIG-Bench-Hard ``<task>.json`` (``{"examples": [{input, target}]}``) sits
  beside the YAMLs, the 3 exemplars are the shots and its examples are
  evaluated; otherwise each exemplar is evaluated with the other two as shots.
* BBH, hub (``lukaemon/bbh``): the first 3 ``test`` examples of a task are
  the shots and the rest are evaluated.

The benchmark's ``protocol`` says which of these ran; it is saved with the results.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from latadj_jax.data import pipeline, sources
from latadj_jax.runtime import hub

BENCHMARKS = ("mmlu", "bbh")
HUB = {"mmlu": "cais/mmlu", "bbh": "lukaemon/bbh"}
MMLU_FILE = "mmlu_cot_prompts.json"
LETTERS = "ABCDEFGHIJ"
FIX = ("pass --config.data_dir=DIR: a directory holding mmlu_cot_prompts.json (MMLU) or "
       "bbh/*.yaml (BBH), in the layout of lm-eval's few-shot files, or the file itself")


@dataclasses.dataclass(frozen=True)
class Example:
  """A question and its answer: MMLU has choices and a letter target, BBH free text."""
  question: str
  target: str
  choices: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Item:
  """One prompt to evaluate: the header, the shots before it and the query."""
  task: str
  header: str
  shots: tuple[Example, ...]
  query: Example


@dataclasses.dataclass
class Benchmark:
  name: str
  items: list[Item]
  protocol: str   # exactly what is evaluated, for the results file
  source: str


# --- prompts and scoring ---------------------------------------------------------------------

def format_example(ex: Example, with_answer: bool) -> str:
  """Returns one question in the direct format; the answer follows when it is a shot."""
  if ex.choices:
    body = ex.question + "".join(f"\n{l}. {c}" for l, c in zip(LETTERS, ex.choices)) + "\nAnswer:"
  else:
    body = f"Q: {ex.question}\nA:"
  return f"{body} {ex.target}" if with_answer else body


def render(item: Item, num_shots: int) -> str:
  """Returns the prompt: header, the first ``num_shots`` shots with answers, then the query."""
  shots = "".join(format_example(s, True) + "\n\n" for s in item.shots[:num_shots])
  return item.header + shots + format_example(item.query, False)


_CHOICE = re.compile(r"^\s*\(?\s*([A-J])\s*(?:[).:]|\s|$)")


def extract_answer(text: str, is_choice: bool) -> str:
  """Returns the answer in a generation: a choice's letter, else the text up to a blank line or 'Q:'."""
  text = re.split(r"\n\n|\bQ:", text, maxsplit=1)[0].strip()
  if is_choice:
    m = _CHOICE.match(text)
    return m.group(1) if m else text
  return text


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> np.ndarray:
  """Returns 1.0 where a prediction equals its target (surrounding whitespace aside), else 0.0."""
  return np.asarray([p.strip() == t.strip() for p, t in zip(predictions, targets)], np.float64)


# --- readers ---------------------------------------------------------------------------------

def parse_mmlu_prompt(text: str) -> tuple[str, list[Example]]:
  """Returns ``(subject, questions)`` of one chain-of-thought prompt of the lm-eval file.

  A question ends at its option line(s) ``(A) ... (B) ...``; its letter is the
  last "The answer is (X)" of the chain of thought. A question without one is skipped.
  """
  header, *chunks = text.strip().split("\n\nQ: ")
  subject = header.rsplit(" about ", 1)[-1].rstrip(".").strip()
  out = []
  for chunk in chunks:
    question, sep, cot = chunk.partition("\nA: ")
    lines = question.split("\n")
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("(A)")]
    answers = re.findall(r"answer is \(?([A-J])\)", cot)
    if not sep or not starts or not answers:
      continue
    parts = re.split(r"\(([A-J])\)\s*", " ".join(lines[starts[-1]:]))
    letters, choices = parts[1::2], tuple(p.strip() for p in parts[2::2])
    if "".join(letters) != LETTERS[:len(letters)] or answers[-1] not in letters:
      continue
    out.append(Example("\n".join(lines[:starts[-1]]).strip(), answers[-1], choices))
  return subject, out


def mmlu_header(subject: str) -> str:
  return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def read_mmlu_local(path: Path, num_shots: int, tasks: Sequence[str] = ()) -> Benchmark:
  """Returns MMLU items from the lm-eval CoT prompt file: each dev question against its subject's others."""
  data = json.loads(path.read_text())
  if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
    raise ValueError(f"{path} is not in the layout of {MMLU_FILE}: a JSON object of "
                     f"subject -> prompt text")
  items, skipped = [], 0
  for key in _select(sorted(data), tasks, "MMLU subject"):
    subject, questions = parse_mmlu_prompt(data[key])
    skipped += data[key].count("\n\nQ: ") - len(questions)
    for i, q in enumerate(questions):
      others = tuple(questions[:i] + questions[i + 1:])[:num_shots]
      items.append(Item(key, mmlu_header(subject), others, q))
  most = max((len(it.shots) for it in items), default=0)
  protocol = (f"MMLU dev questions from {path.name}: each evaluated once, with the other questions "
              f"of its subject (in file order, at most {most}) as direct-answer shots "
              f"(chain of thought dropped); {len(items)} questions, {skipped} unparsed skipped")
  return Benchmark("mmlu", items, protocol, str(path))


def _read_yaml(path: Path) -> dict:
  import yaml

  class _Loader(yaml.SafeLoader):  # lm-eval configs may hold tags such as !function
    pass
  _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
  return yaml.load(path.read_text(), Loader=_Loader) or {}


def _read_bbh_eval(directory: Path, task: str) -> list[Example] | None:
  """Returns a BIG-Bench-Hard ``<task>.json`` file's examples (beside the YAMLs or in data/)."""
  for path in (directory / f"{task}.json", directory / "data" / f"{task}.json"):
    if path.is_file():
      rows = json.loads(path.read_text())["examples"]
      return [Example(str(r["input"]), str(r["target"])) for r in rows]
  return None


def read_bbh_local(directory: Path, num_shots: int, tasks: Sequence[str] = ()) -> Benchmark:
  """Returns BBH items from lm-eval task YAMLs (and BIG-Bench-Hard JSON eval files if present)."""
  configs = {}
  for path in sorted(directory.glob("*.yaml")):
    cfg = _read_yaml(path)
    samples = (cfg.get("fewshot_config") or {}).get("samples")
    if samples:  # group files such as _bbh_fewshot.yaml hold no samples
      configs[cfg.get("dataset_name", path.stem)] = cfg
  if not configs:
    raise sources.DataUnavailableError(f"no BBH task YAML with fewshot_config.samples in "
                                       f"{directory}; {FIX}")
  items, held_out, with_file = [], [], []
  for task in _select(sorted(configs), tasks, "BBH task"):
    cfg = configs[task]
    shots = [Example(str(s["input"]), str(s["target"])) for s in cfg["fewshot_config"]["samples"]]
    header = str(cfg.get("description", ""))
    evals = _read_bbh_eval(directory, task)
    if evals is not None:
      with_file.append(task)
      items += [Item(task, header, tuple(shots[:num_shots]), ex) for ex in evals]
    else:
      held_out.append(task)
      items += [Item(task, header, tuple(shots[:i] + shots[i + 1:])[:num_shots], ex)
                for i, ex in enumerate(shots)]
  parts = []
  if with_file:
    parts.append(f"{len(with_file)} tasks with a <task>.json: their examples, after the YAML's "
                 f"exemplars (at most {num_shots}) as shots")
  if held_out:
    parts.append(f"{len(held_out)} tasks with no eval file: each YAML exemplar evaluated with the "
                 f"task's other exemplars as shots (leave-one-out, so 2-shot)")
  return Benchmark("bbh", items, f"BBH from {directory}: " + "; ".join(parts)
                   + f"; {len(items)} items", str(directory))


def _select(available: Sequence[str], wanted: Sequence[str], what: str) -> list[str]:
  """Returns ``wanted`` (all when empty), or raises ValueError naming the unknown ones."""
  unknown = sorted(set(wanted) - set(available))
  if unknown:
    raise ValueError(f"unknown {what} {unknown}; available: {', '.join(available)}")
  return list(wanted) if wanted else list(available)


def read_hub(name: str, num_shots: int, tasks: Sequence[str] = ()) -> Benchmark:
  """Returns the benchmark from the HF hub; fails at once, naming --config.data_dir, when offline."""
  reason = hub.dataset_problem()
  if reason:
    raise sources.HubDataError(f"tried to load the HF hub dataset {HUB[name]}, but "
                               f"{reason}. For local files, {FIX}.")
  import datasets
  items = []
  if name == "mmlu":
    dd = datasets.load_dataset(HUB[name], "all")
    dev, test = dd["dev"].to_pandas(), dd["test"].to_pandas()
    to_ex = lambda r: Example(r.question, LETTERS[int(r.answer)], tuple(map(str, r.choices)))
    for subject in _select(sorted(set(test.subject)), tasks, "MMLU subject"):
      shots = tuple(to_ex(r) for r in dev[dev.subject == subject].itertuples())[:num_shots]
      header = mmlu_header(subject.replace("_", " "))
      items += [Item(subject, header, shots, to_ex(r)) for r in test[test.subject == subject].itertuples()]
    protocol = f"MMLU test questions, {num_shots}-shot from the subject's dev questions"
  else:
    for task in _select(datasets.get_dataset_config_names(HUB[name]), tasks, "BBH task"):
      rows = [Example(r["input"], r["target"]) for r in datasets.load_dataset(HUB[name], task)["test"]]
      items += [Item(task, "", tuple(rows[:num_shots]), ex) for ex in rows[num_shots:]]
    protocol = f"BBH test examples after the first {num_shots} of each task, which are the shots"
  return Benchmark(name, items, protocol, f"hub:{HUB[name]}")


def load_benchmark(config) -> Benchmark:
  """Returns the config's benchmark items (``config.max_items`` > 0 keeps that many, spread over tasks)."""
  name = config.benchmark
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)}")
  tasks, shots = tuple(config.tasks), int(config.num_shots)
  source = config.data_source if config.data_source != "auto" else (
      "local" if config.data_dir else "hub")
  if source == "hub":
    bench = read_hub(name, shots, tasks)
  elif source == "local":
    if not config.data_dir:
      raise sources.DataUnavailableError(f"data_source=local needs a path; {FIX}.")
    bench = _read_local(name, Path(config.data_dir).expanduser(), shots, tasks)
  else:
    raise ValueError(f"unknown data source {source!r}; use auto, local or hub")
  if config.max_items > 0:
    bench.items = spread(bench.items, config.max_items)
    bench.protocol += f"; the first {len(bench.items)} of them taken round-robin over tasks"
  return bench


def _read_local(name: str, path: Path, shots: int, tasks: Sequence[str]) -> Benchmark:
  if name == "mmlu":
    file = path if path.is_file() else path / MMLU_FILE
    if not file.is_file():
      raise sources.DataUnavailableError(f"no {MMLU_FILE} at {path}; {FIX}.")
    return read_mmlu_local(file, shots, tasks)
  directory = path / "bbh" if (path / "bbh").is_dir() else path
  if not directory.is_dir():
    raise sources.DataUnavailableError(f"no BBH directory at {path}; {FIX}.")
  return read_bbh_local(directory, shots, tasks)


def spread(items: Sequence[Item], n: int) -> list[Item]:
  """Returns ``n`` items taken round-robin over tasks, so a small sample covers many tasks."""
  by_task: dict[str, list[Item]] = {}
  for it in items:
    by_task.setdefault(it.task, []).append(it)
  out, depth = [], 0
  while len(out) < min(n, len(items)):
    out += [group[depth] for group in by_task.values() if depth < len(group)][:n - len(out)]
    depth += 1
  return out


# --- tokenization: fit the shots into the longest bucket -------------------------------------

@dataclasses.dataclass
class Prompts:
  """Tokenized prompts and how many shots each kept."""
  encoded: pipeline.Encoded
  shots_used: list[int]
  num_truncated: int   # prompts still too long with zero shots, cut from the left


def tokenize(items: Sequence[Item], tokenizer, max_len: int, num_shots: int) -> Prompts:
  """Returns the prompts tokenized; a prompt over ``max_len`` tokens drops its last shots first."""
  ids, used, truncated = [], [], 0
  for item in items:
    n = min(num_shots, len(item.shots))
    while True:
      seq = tokenizer(render(item, n))["input_ids"]
      if len(seq) <= max_len or n == 0:
        break
      n -= 1
    if len(seq) > max_len:  # keep the end: the question, its options and EOS
      seq, truncated = seq[-max_len:], truncated + 1
    ids.append(np.asarray(seq, np.int32))
    used.append(n)
  enc = pipeline.Encoded(ids, [np.zeros_like(x) for x in ids], np.arange(len(ids)), truncated,
                         max_len)
  return Prompts(enc, used, truncated)
