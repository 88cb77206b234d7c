"""One config source: constants defined once, cache keys from a hashable frozen view of the config."""
import ast
from pathlib import Path

import ml_collections

from configs import common
from humpback_jax import config
from humpback_jax.model import build

ROOT = Path(__file__).resolve().parent.parent


def module_level_strings(path: Path):
  """(value, line) of every string literal a module-level assignment binds, alone or in a tuple."""
  for node in ast.parse(path.read_text(encoding="utf-8")).body:
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
      values = node.value.elts if isinstance(node.value, (ast.Tuple, ast.List)) else [node.value]
      for value in values:
        if isinstance(value, ast.Constant) and isinstance(value.value, str) and len(value.value) >= 12:
          yield value.value, node.lineno


def test_no_string_constant_is_defined_in_two_places():
  where: dict[str, list[str]] = {}
  for path in sorted([*ROOT.glob("humpback_jax/**/*.py"), *ROOT.glob("configs/*.py")]):
    for value, line in module_level_strings(path):
      where.setdefault(value, []).append(f"{path.relative_to(ROOT)}:{line}")
  twice = {value[:40]: places for value, places in where.items() if len(places) > 1}
  assert not twice, f"define each once and import it: {twice}"


def test_the_llama2_template_is_the_tokenizers():
  from humpback_jax import tokenizer
  assert common.LLAMA2_INST is tokenizer.LLAMA2_INST


def test_equal_configs_share_one_frozen_key_and_a_changed_field_does_not():
  locked = common.model_preset("toy")
  locked.lock()
  assert config.frozen(locked) == config.frozen(common.model_preset("toy"))
  assert hash(config.frozen(locked)) == hash(config.frozen(common.model_preset("toy")))
  assert config.frozen(common.model_preset("toy", num_layers=2)) != config.frozen(locked)


def test_abstract_model_is_built_once_per_distinct_config():
  a, b = common.model_preset("toy", num_layers=1), common.model_preset("toy", num_layers=1)
  assert build.abstract_model(a) is build.abstract_model(b)  # equal configs: one cache entry
  assert build.abstract_model(common.model_preset("toy", num_layers=2)) is not build.abstract_model(a)


def test_the_frozen_view_is_read_like_the_config():
  frozen = config.frozen(common.model_preset("llama3.1_8b"))
  assert isinstance(frozen, ml_collections.FrozenConfigDict)
  assert frozen.rope_scaling.factor == 8.0 and config.head_dim(frozen) == 128
