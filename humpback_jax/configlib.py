"""Loading configs: `path/to/file.py:arg` plus `--config.a.b=value` overrides, then locked.

The schema of the model config and every check of a run config live in `config.py`; the presets
the files build from in `configs/common.py`. Every failure names the config key.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

import ml_collections

from humpback_jax.errors import ConfigError


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` of the file in `spec` ('file.py' or 'file.py:arg'), applies overrides, locks."""
  path, _, arg = spec.partition(":")
  file = Path(path).absolute()
  if not file.exists():
    raise ConfigError(f"--config: file {path} does not exist")
  root = str(file.parent.parent)  # so that `from configs import common` works
  if root not in sys.path:
    sys.path.insert(0, root)
  module_spec = importlib.util.spec_from_file_location(f"_humpback_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  cfg = module.get_config(arg or None)
  apply_overrides(cfg, overrides)
  cfg.lock()
  return cfg


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies `config.a.b=value` (or `a.b=value`) strings; values are Python literals or strings."""
  for item in overrides:
    key, sep, raw = item.removeprefix("--").removeprefix("config.").partition("=")
    if not sep:
      raise ConfigError(f"override {item!r}: expected config.KEY=VALUE")
    node, parts = cfg, key.split(".")
    for p in parts[:-1]:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise ConfigError(f"config.{key}: unknown field {p!r}")
      node = node[p]
    if parts[-1] not in node:
      raise ConfigError(f"config.{key}: unknown field; known here: {', '.join(sorted(node.keys()))}")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    old = node[parts[-1]]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    if old is not None and not isinstance(value, type(old)):
      raise ConfigError(f"config.{key}: expected {type(old).__name__}, got {raw!r}")
    node[parts[-1]] = value
