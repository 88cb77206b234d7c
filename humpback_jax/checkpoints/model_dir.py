"""Our model checkpoint: a folder with `model.json` (model config, tokenizer info, chat
template), the tokenizer file, and `params/` written by orbax (sharded, restorable onto any mesh).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from humpback_jax import sharding
from humpback_jax.errors import ConfigError, DataError
from humpback_jax.config import model_config
from humpback_jax.model import build, stacking

MODEL_JSON = "model.json"


def is_model_dir(path: Path) -> bool:
  """True when `path` is one of our checkpoints."""
  return (Path(path) / MODEL_JSON).exists() and (Path(path) / "params").exists()


def save(path: Path, params, model_cfg, *, tokenizer_file: Path | None = None,
         chat_template: str | None = None) -> None:
  """Writes params (orbax), the model config and the tokenizer; the folder appears complete or not at all."""
  path = Path(path).absolute()
  tmp = path.with_name(path.name + ".partial")
  if jax.process_index() == 0:
    if tmp.exists():
      shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
  multihost_utils.sync_global_devices(f"model_dir.save:start:{path}")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp / "params", params)
  checkpointer.wait_until_finished()
  multihost_utils.sync_global_devices(f"model_dir.save:written:{path}")  # every process's shards are on disk
  if jax.process_index() == 0:  # one writer: another process must not touch the folder while it is renamed
    name = None
    if tokenizer_file is not None:
      name = Path(tokenizer_file).name
      shutil.copy(tokenizer_file, tmp / name)
    meta = dict(model=model_cfg.to_dict(), chat_template=chat_template, tokenizer=name)
    (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2))
    if path.exists():
      shutil.rmtree(path)
    tmp.rename(path)
  multihost_utils.sync_global_devices(f"model_dir.save:done:{path}")


def read_meta(path: Path) -> dict:
  """The `model.json` of a checkpoint, with `model` as a ConfigDict."""
  f = Path(path) / MODEL_JSON
  try:
    meta = json.loads(f.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"{f}: cannot read checkpoint metadata ({e})", path=f) from e
  if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
    raise DataError(f"{f}: field 'model' (the model config) is missing; the checkpoint is incomplete", path=f,
                    field="model")
  try:
    meta["model"] = model_config(**meta["model"])  # fields added since it was written take their defaults
  except (ConfigError, TypeError) as e:  # an unknown field, or a value of the wrong type
    raise DataError(f"{f}: {e}; the checkpoint's model config is damaged", path=f, field="model") from None
  return meta


def tokenizer_path(path: Path, meta: dict) -> Path | None:
  """The checkpoint's tokenizer file named in model.json, which must lie inside the checkpoint."""
  name = meta.get("tokenizer")
  if not name:
    return None
  folder = Path(path).resolve()
  file = (folder / str(name)).resolve()
  if not isinstance(name, str) or Path(name).is_absolute() or not file.is_relative_to(folder):
    raise DataError(f"{Path(path) / MODEL_JSON}: field 'tokenizer' ({name!r}) points outside the checkpoint "
                    "folder; it must name a file inside it", path=Path(path) / MODEL_JSON, field="tokenizer")
  return file


def tokenizer_file_of(src: Path) -> Path | None:
  """The tokenizer file of any checkpoint: a GGUF file itself, a Hugging Face folder's
  tokenizer.model / tokenizer.json, our folder's (model.json), or a tokenizer file given directly."""
  src = Path(src)
  if src.is_file():
    return src
  for name in ("tokenizer.model", "tokenizer.json"):
    if (src / name).exists():
      return src / name
  if (src / MODEL_JSON).exists():
    return tokenizer_path(src, read_meta(src))
  return None


def check_params(path: Path, model_cfg) -> None:
  """Every saved tensor's name and shape against model.json's config (from orbax's metadata, no restore)."""
  from humpback_jax.checkpoints import hf, weights_check
  params = Path(path).absolute() / "params"
  try:
    saved = ocp.StandardCheckpointer().metadata(params).item_metadata
  except Exception as e:  # orbax raises several types for a missing or damaged folder
    raise DataError(f"{params}: cannot read the saved parameters' metadata ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:200]}); the checkpoint is damaged", path=params) from None
  found = {name: tuple(m.shape) for name, m in hf.flatten(_as_dict(saved)).items()}
  stacked = not any(re.match(r"layers/\d+/", name) for name in found)
  if found and stacked != bool(model_cfg.scan_layers):
    raise DataError(f"{params}: the layers are saved {'stacked' if stacked else 'as a list'}, but "
                    f"{Path(path) / MODEL_JSON} has model.scan_layers = {str(bool(model_cfg.scan_layers)).lower()}; "
                    "fix model.json", path=params, field="model.scan_layers")
  expected = {name: (name, tuple(s.shape)) for name, s in hf.flatten(build.abstract_params(model_cfg)).items()}
  fields = weights_check.OURS_FIELDS if model_cfg.head_dim else weights_check.derived_head_dim(weights_check.OURS_FIELDS)
  weights_check.check(str(params), str(Path(path) / MODEL_JSON), model_cfg, found, expected, fields)


def _as_dict(tree):
  """Orbax metadata trees (string keys) as nested dicts with the keys our params use."""
  if hasattr(tree, "items"):
    return {str(k): _as_dict(v) for k, v in tree.items()}
  return tree


def restore_params(path: Path, model_cfg, layout: sharding.Layout):
  """Restores params straight into the shardings of `layout` (any mesh, not only the saving one),
  in the layer form `model_cfg.scan_layers` asks for whichever form the checkpoint stores, after
  checking every saved tensor against the config."""
  saved_cfg = model_config(**{**model_cfg.to_dict(), "scan_layers": read_meta(path)["model"].scan_layers})
  check_params(path, saved_cfg)
  shardings = build.param_shardings(saved_cfg, layout)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          build.abstract_params(saved_cfg), shardings)
  params = ocp.StandardCheckpointer().restore(Path(path).absolute() / "params", abstract)
  return stacking.to_form(params, model_cfg, build.param_shardings(model_cfg, layout))
