"""`humpback_jax.load(path)`: one handle over our checkpoints, Hugging Face folders and GGUF files.

The handle carries the model config, the sharded params, the tokenizer and the chat template,
and offers `logits`, `generate` and `score`, the calls users script against.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from humpback_jax import sharding, tokenizer as tokenizer_lib
from humpback_jax.checkpoints import hf, model_dir
from humpback_jax.config import frozen
from humpback_jax.errors import DataError
from humpback_jax.model import build


def detect_format(path: Path) -> str:
  """'ours', 'hf' or 'gguf' from what is at `path`; a clear error otherwise."""
  path = Path(path)
  if path.is_file() and path.suffix == ".gguf":
    return "gguf"
  if model_dir.is_model_dir(path):
    return "ours"
  if path.is_dir() and (path / "config.json").exists():
    return "hf"
  raise DataError(f"{path}: not a model: expected our checkpoint (model.json + params/), a Hugging Face "
                  "folder (config.json + *.safetensors) or a .gguf file", path=path)


def default_layout() -> sharding.Layout:
  """Data-parallel over every local device: the right default for inference."""
  mesh_cfg = ml_collections.ConfigDict(dict(axes=sharding.MESH_AXES, shape=(-1, 1, 1)))
  return sharding.Layout(sharding.make_mesh(mesh_cfg))


def load_weights(path: Path, layout: sharding.Layout, *, fmt: str = "auto", dtype: str | None = None,
                 scan_layers: bool | None = None):
  """(model config, params placed on `layout`, tokenizer or None, chat template) from any format.

  `scan_layers` picks the layer form of the params (stacked or a list); None keeps our checkpoint's
  own form, and the list form for HF and GGUF.
  """
  path = Path(path)
  fmt = detect_format(path) if fmt == "auto" else fmt
  if fmt == "ours":
    meta = model_dir.read_meta(path)
    cfg = meta["model"]
    _set_options(cfg, dtype, scan_layers)
    params = model_dir.restore_params(path, cfg, layout)
    tok_file = model_dir.tokenizer_path(path, meta)
    tok = tokenizer_lib.load_tokenizer(tok_file) if tok_file else None
    return cfg, params, tok, meta.get("chat_template") or tokenizer_lib.LLAMA2_INST
  if fmt == "hf":
    cfg = hf.read_config(path)
    _set_options(cfg, dtype, scan_layers)
    params = hf.load_params(path, cfg, layout)
    has_tok = any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
    tok = tokenizer_lib.load_tokenizer(path) if has_tok else None
    return cfg, params, tok, tokenizer_lib.LLAMA2_INST
  if fmt == "gguf":
    from humpback_jax.checkpoints import gguf
    cfg = gguf.read_config(path)
    _set_options(cfg, dtype, scan_layers)
    params = gguf.load_params(path, cfg, layout)
    return cfg, params, tokenizer_lib.load_tokenizer(path), tokenizer_lib.CHATML
  raise DataError(f"{path}: unknown format {fmt!r} (expected ours, hf or gguf)", path=path)


def _set_options(cfg, dtype, scan_layers=None):
  if dtype:
    cfg.dtype = dtype
  if scan_layers is not None:
    cfg.scan_layers = bool(scan_layers)


@dataclasses.dataclass
class Model:
  """A loaded model: config, sharded params, tokenizer, chat template and the layout it lives on."""
  cfg: ml_collections.ConfigDict
  params: dict
  tokenizer: object
  chat_template: str
  layout: sharding.Layout

  def logits(self, token_ids) -> np.ndarray:
    """Float32 logits [batch, len, vocab] for int token ids [batch, len] (or one [len] row)."""
    ids = np.asarray(token_ids, dtype=np.int32)
    squeeze = ids.ndim == 1
    ids = ids[None] if squeeze else ids
    out = np.asarray(_logits_fn(frozen(self.cfg), self.layout)(self.params, jnp.asarray(ids)))
    return out[0] if squeeze else out

  @functools.cached_property
  def engine(self):
    """The batched generation and scoring engine over these params."""
    from humpback_jax import generate
    return generate.Engine(self.cfg, self.params, self.layout)

  def render(self, instruction: str) -> str:
    """The instruction wrapped in this model's chat template."""
    return tokenizer_lib.render_chat(self.chat_template, instruction)

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.7,
               top_p: float = 0.9, top_k: int = 0, seed: int = 0, chat: bool = True,
               stop: Sequence[str] = ()) -> list[str]:
    """Completions for text prompts (chat template applied when `chat`), new text only."""
    from humpback_jax import generate
    tok = self._tokenizer()
    ids = [tok.encode_prompt(self.render(p) if chat else p) for p in prompts]
    sampling = generate.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                       max_new_tokens=max_new_tokens, seed=seed)
    stopped = (lambda i, new: any(s and s in tok.decode(new) for s in stop)) if stop else None  # frees a slot early
    outs = self.engine.generate_ids(ids, sampling, eos_ids=[tok.eos_id], stop=stopped)
    return [generate.truncate_at_stop(tok.decode(o), stop) if o is not None else None for o in outs]

  def score(self, prompts: Sequence[str], continuations: Sequence[str], *, chat: bool = True) -> np.ndarray:
    """log p(continuation | prompt) summed over the continuation's tokens, per pair."""
    tok = self._tokenizer()
    p_ids = [tok.encode_prompt(self.render(p) if chat else p) for p in prompts]
    c_ids = [tok.encode(c) for c in continuations]
    return self.engine.loglikelihood(p_ids, c_ids)

  def _tokenizer(self):
    if self.tokenizer is None:
      raise DataError("this checkpoint has no tokenizer; pass token ids to logits() or add one")
    return self.tokenizer


@functools.lru_cache(maxsize=8)
def _logits_fn(cfg: ml_collections.FrozenConfigDict, layout: sharding.Layout):
  return jax.jit(lambda p, t: build.forward(cfg, p, t, layout=layout)[0])


def load(path, *, layout: sharding.Layout | None = None, fmt: str = "auto", dtype: str | None = None,
         scan_layers: bool | None = None) -> Model:
  """Loads our checkpoint, a Hugging Face folder or a GGUF file into a `Model` handle."""
  layout = layout or default_layout()
  cfg, params, tok, template = load_weights(Path(path), layout, fmt=fmt, dtype=dtype, scan_layers=scan_layers)
  return Model(cfg=cfg, params=params, tokenizer=tok, chat_template=template, layout=layout)
