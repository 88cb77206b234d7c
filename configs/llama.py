"""Model configs by size: `--config=configs/llama.py:7b` or `...:variant=llama2_70b,mesh=gpu8`.

Variants: toy, bench20m, llama1_7b/13b/33b/65b (alias 7b..65b: the paper's models),
llama2_7b/13b/70b, llama3_8b, llama3.1_8b, smollm2_135m. Meshes: see configs/common.py.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="toy", mesh="data")
  config = ml_collections.ConfigDict()
  config.model = common.model_preset(arg.variant)
  config.mesh = common.mesh_preset(arg.mesh)
  config.tokenizer = ml_collections.ConfigDict(dict(path="", chat_template=common.LLAMA2_INST))
  config.train = common.train_config()
  config.generate = common.generate_config()
  return config
