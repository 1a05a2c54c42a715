"""End-to-end few-shot run (MMLU and BBH, local files) with a tiny random T5: the pipeline, not quality.

No T5 weights or T5 tokenizer can be had offline here, so this builds both:

* a Unigram tokenizer (the kind T5's SentencePiece model is), trained with the
  ``tokenizers`` library on the few-shot files themselves, with T5's special ids
  (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and ``</s>`` appended to every prompt;
* a tiny Flan-T5-shaped model (gated-GELU, untied head) with random weights,
  saved as an HF directory (``config.json``, ``flax_model.msgpack``, tokenizer).

It then runs the real CLI, ``eval.py --config=flan_t5_mmlu`` and
``--config=flan_t5_bbh``, on ``../shared/data/fewshot`` at several k, and
gathers both results files. Scores are near zero by construction (random
weights); the speedup columns show what elimination does on these prompt lengths.

    python benchmarks/fewshot_tiny_t5.py --data_dir ../shared/data/fewshot
    python benchmarks/fewshot_tiny_t5.py --data_dir DIR --max_items 20 --out /tmp/fs.json  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "fewshot"))
  p.add_argument("--coeff", default="1.0,0.9,0.8")
  p.add_argument("--max_items", type=int, default=0, help="per benchmark; 0: all")
  p.add_argument("--layers", type=int, default=4, help="encoder and decoder layers each")
  p.add_argument("--vocab_size", type=int, default=2000)
  p.add_argument("--repeats", type=int, default=10, help="interleaved timed rounds (median)")
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fewshot_tiny_t5.json"))
  return p.parse_args(argv)


def corpus(data_dir: Path) -> list[str]:
  """Returns the text of the few-shot files, to train the tokenizer on."""
  texts = list(json.loads((data_dir / "mmlu_cot_prompts.json").read_text()).values())
  texts += [p.read_text() for p in sorted((data_dir / "bbh").glob("*.yaml"))]
  return texts


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int):
  """Returns a T5-like fast tokenizer (Unigram, Metaspace) trained on ``texts``, saved in ``out_dir``."""
  import transformers
  from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
  )
  tok = Tokenizer(models.Unigram())
  # As T5's SentencePiece model: NFKC, and every run of whitespace (newlines too) is one space.
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                         normalizers.Replace(Regex(r"\s+"), " ")])
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(texts, trainers.UnigramTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              eos_token="</s>", unk_token="<unk>")
  fast.save_pretrained(str(out_dir))
  return fast


def write_tiny_t5(out_dir: Path, vocab_size: int, layers: int, d_model: int = 64, seed: int = 0):
  """Writes a random tiny Flan-T5-shaped model (config.json + flax_model.msgpack) to ``out_dir``."""
  from flax import serialization

  from latadj_jax import models
  hf_config = {"model_type": "t5", "vocab_size": vocab_size, "d_model": d_model, "d_kv": 16,
               "d_ff": 2 * d_model, "num_layers": layers, "num_decoder_layers": layers,
               "num_heads": d_model // 16, "relative_attention_num_buckets": 32,
               "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
               "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
               "decoder_start_token_id": 0}
  params = models.build(hf_config).init(seed)
  (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
  (out_dir / "flax_model.msgpack").write_bytes(serialization.to_bytes(params))
  return hf_config


def run_cli(config: str, model_dir: Path, data_dir: Path, out_dir: Path, args) -> dict:
  """Returns the results JSON of one ``eval.py --config=...`` run (the real CLI, in a subprocess)."""
  cmd = [sys.executable, str(REPO / "eval.py"), f"--config={config}",
         f"--config.model={model_dir}", f"--config.data_dir={data_dir}",
         f"--config.max_items={args.max_items}", "--coeff", args.coeff,
         "--repeats", str(args.repeats), "--out", str(out_dir)]
  print("$ " + " ".join(cmd), file=sys.stderr)
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  subprocess.run(cmd, check=True, env=env, cwd=REPO)
  result = json.loads((out_dir / "fewshot_results.json").read_text())
  lines = (out_dir / "fewshot_predictions.jsonl").read_text().splitlines()
  result["sample_predictions"] = [json.loads(line) for line in lines[:3]]
  return result


def markdown(result: dict) -> str:
  """Returns both runs as one Markdown table."""
  lines = ["| benchmark | items | k | exact match | keep counts (main bucket) | expected S (eq. 7) "
           "| FLOPs ratio | measured encoder speedup | encoder ms | generate ms |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for run in result["runs"].values():
    for r in run["rows"]:
      c = r["keep_counts"]
      lines.append(f"| {run['benchmark']} | {run['num_items']} | {r['coeff']:g} | "
                   f"{100 * r['score']:.1f} | {r['main_bucket']}: {c[0]} … {c[-1]} | "
                   f"{r['expected_speedup']:.2f}x | {r['flops_ratio']:.2f}x | "
                   f"{r['measured_speedup']:.2f}x | {r['encoder_ms']:.0f} | {r['generate_ms']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  data_dir = Path(args.data_dir).resolve()
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = Path(tmp) / "tiny_t5"
    model_dir.mkdir()
    tokenizer = train_tokenizer(corpus(data_dir), model_dir, args.vocab_size)
    hf_config = write_tiny_t5(model_dir, len(tokenizer), args.layers)
    runs = {name: run_cli(name, model_dir, data_dir, Path(tmp) / name, args)
            for name in ("flan_t5_mmlu", "flan_t5_bbh")}
  result = {
      "benchmark": "fewshot_tiny_t5",
      "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
      "what": "the few-shot pipeline end to end on the real local MMLU/BBH files; random "
              "weights, so the scores say nothing about quality",
      "tokenizer": f"Unigram ({len(tokenizer)} pieces, Metaspace, whitespace runs -> one space), "
                   f"trained with the tokenizers library on the few-shot files; <pad>=0 </s>=1 <unk>=2",
      "model": {k: v for k, v in hf_config.items() if k != "model_type"},
      "load_average": {"before": load_before, "after": os.getloadavg(),
                       "note": "1/5/15-minute load on the shared 2-core machine; timings are "
                               "noisy when it is far above 2"},
      "runs": {name: {k: v for k, v in r.items() if k != "config"} for name, r in runs.items()}}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(markdown(result))
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
