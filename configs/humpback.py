"""The whole method at paper scale, for every model preset:
  humpback pipeline --config=configs/humpback.py:model=llama1_7b,mesh=fsdp --workdir=runs/7b \\
    --config.base.checkpoint=/ckpt/llama-7b-hf --config.data.seed_path=/data/oasst1 \\
    --config.data.corpus_path=/data/clueweb_segments
  humpback plan --config=configs/humpback.py:model=llama1_65b,mesh=fsdp --topology=v5p:4x4x4 --compile

Required, with no default (the run stops naming the field before any model runs):
  base.checkpoint   the pretrained LLaMA: our checkpoint folder, a Hugging Face folder or a .gguf file
  data.seed_path    the seed set: an OASST export or (instruction, output) JSONL (3,200 pairs, as the paper)
  data.corpus_path  the unlabelled corpus (folder, txt, JSONL, WARC), or data.corpus_tfds_name
The tokenizer is the base checkpoint's unless tokenizer.path names another. Everything else is
the paper's: `generate` curation (the judge writes "Score: N"), k=5, two iterations, the SFT
recipe of configs/common.py. Accelerator settings: bfloat16 compute over float32 master weights,
every layer rematerialised, kernels by the mesh's platform (splash attention on TPU).
Models: any preset of configs/common.py MODELS (llama1_7b/13b/33b/65b, llama2_*, llama3_8b, ...).
"""
import ml_collections

from configs import common
from humpback_jax.data import corpus


def get_config(arg=None):
  arg = common.parse_arg(arg, model="llama1_7b", mesh="fsdp")
  config = ml_collections.ConfigDict()
  config.model = common.model_preset(arg.model, dtype="bfloat16", param_dtype="float32", remat_policy="full")
  config.mesh = common.mesh_preset(arg.mesh)
  config.base = ml_collections.ConfigDict(dict(checkpoint="", format="auto"))
  config.tokenizer = ml_collections.ConfigDict(dict(path="", chat_template=common.LLAMA2_INST))
  config.data = common.data_config()
  config.corpus = ml_collections.ConfigDict(corpus.corpus_config())  # data/corpus.py: keys and defaults
  config.train = common.train_config(seq_len=min(2048, config.model.max_seq_len))
  config.generate = common.generate_config(batch_size=256, prompt_buckets=(256, 512, 1024))
  config.pipeline = common.pipeline_config()
  return config
