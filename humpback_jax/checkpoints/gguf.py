"""LLaMA checkpoints in llama.cpp's GGUF format (e.g. the SmolLM2-135M-Instruct Q4_1 file).

Import only. Each tensor is dequantised on its own when `hf.place` asks for it, mapped to the
Hugging Face layout (undoing llama.cpp's q/k row permutation), and placed onto its sharding,
so peak host memory is one dequantised tensor beyond the memory-mapped file.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import gguf
import numpy as np

from humpback_jax.checkpoints import gguf_layout, hf, weights_check
from humpback_jax.config import head_dim, model_config
from humpback_jax.errors import DataError
from humpback_jax.model.llama import rope_frequencies

GGUF_NAMES = {"embed": "token_embd.weight", "final_norm/scale": "output_norm.weight",
              "lm_head": "output.weight"}
# our per-layer path suffix -> GGUF name within `blk.{i}.`
LAYER_NAMES = {
    "attn_norm/scale": "attn_norm", "mlp_norm/scale": "ffn_norm",
    "attn/q": "attn_q", "attn/k": "attn_k", "attn/v": "attn_v", "attn/o": "attn_output",
    "mlp/gate": "ffn_gate", "mlp/up": "ffn_up", "mlp/down": "ffn_down",
}
# Meta's LLaMA-3.x rope scaling; llama.cpp stores only the resulting per-frequency factors.
LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def gguf_name(path: str) -> str:
  """The GGUF tensor name of one of our parameter paths (e.g. 'layers/3/attn/q' -> 'blk.3.attn_q.weight')."""
  m = re.fullmatch(r"layers/(\d+)/(.+)", path)
  if m and m[2] in LAYER_NAMES:
    return f"blk.{m[1]}.{LAYER_NAMES[m[2]]}.weight"
  if path in GGUF_NAMES:
    return GGUF_NAMES[path]
  raise KeyError(f"no GGUF name for parameter {path!r}")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's q/k row permutation (convert_hf_to_gguf.py): within each head, HF's half-split
  rotary rows [x0, x1, ..., y0, y1, ...] become interleaved pairs [x0, y0, x1, y1, ...]."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of `permute_rows`: GGUF q/k rows (interleaved rotary pairs) back to HF's half-split order."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_reader(path) -> gguf.GGUFReader:
  """A memory-mapped GGUF reader; fails naming the file when it is missing or not LLaMA."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: GGUF file not found", path=path)
  gguf_layout.check(path)  # a cut or damaged file named by offset or tensor before the reader maps it
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # what the layout walk does not cover (e.g. a value of the wrong type)
    raise DataError(f"{path}: malformed GGUF ({path.stat().st_size} bytes; the reader stopped with "
                    f"{type(e).__name__}: {e}); download the file again", path=path) from None
  arch = _field(reader, path, "general.architecture")
  if arch != "llama":
    raise DataError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files can be imported",
                    path=path, field="general.architecture")
  return reader


def read_config(path, reader: gguf.GGUFReader | None = None):
  """Our model config from a GGUF file's `llama.*` metadata and tensor shapes."""
  reader = open_reader(path) if reader is None else reader
  tensors = {t.name: t for t in reader.tensors}
  get = functools.partial(_field, reader, path)
  num_heads = get("llama.attention.head_count")
  dim = get("llama.embedding_length")
  cfg = model_config(
      vocab_size=_vocab_size(reader, path, tensors),
      dim=dim,
      num_layers=get("llama.block_count"),
      num_heads=num_heads,
      num_kv_heads=get("llama.attention.head_count_kv", num_heads),
      head_dim=get("llama.attention.key_length", dim // num_heads),
      mlp_dim=get("llama.feed_forward_length"),
      norm_eps=float(get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(get("llama.rope.freq_base", 10000.0)),
      max_seq_len=get("llama.context_length", 2048),
      tie_embeddings="output.weight" not in tensors,
  )
  scaling = get("llama.rope.scaling.type", "none")
  if scaling != "none":
    raise DataError(f"{path}: llama.rope.scaling.type {scaling!r} is not supported (only LLaMA-3 "
                    "rope_freqs.weight)", path=path, field="llama.rope.scaling.type")
  if "rope_freqs.weight" in tensors:
    cfg.rope_scaling.update(_llama3_rope_scaling(path, cfg, tensors["rope_freqs.weight"]))
  return cfg


def load_params(path, cfg, layout, dtype=None, reader: gguf.GGUFReader | None = None):
  """Imports GGUF weights onto `layout`, dequantising one tensor at a time, after checking every
  tensor's name and shape against the metadata; returns our nested params."""
  reader = open_reader(path) if reader is None else reader
  tensors = {t.name: t for t in reader.tensors}
  expected = {gguf_name(p): (p, shape) for p, shape in
              hf.hf_shapes(cfg, weights_check.per_layer_paths(cfg)).values()}
  fields = weights_check.GGUF_FIELDS
  if reader.get_field("llama.attention.key_length") is None:
    fields = weights_check.derived_head_dim(fields)
  weights_check.check(str(path), "the GGUF metadata", cfg, {n: tuple(reversed(t.shape.tolist())) for n, t in tensors.items()},
                      expected, fields, ignore=lambda name: name == "rope_freqs.weight")

  def get_hf_tensor(our_path):
    name = gguf_name(our_path)
    if name not in tensors:
      raise DataError(f"{path}: tensor {name!r} (for {our_path}) is missing", path=path, field=name)
    w = _dequantize(path, tensors[name])
    leaf = our_path.rsplit("/", 1)[-1]
    if leaf in ("q", "k"):
      n_head = cfg.num_heads if leaf == "q" else cfg.num_kv_heads
      if w.ndim != 2 or w.shape[0] != n_head * head_dim(cfg):
        raise DataError(f"{path}: tensor {name!r} has shape {w.shape}, expected "
                        f"{n_head * head_dim(cfg)} rows", path=path, field=name)
      w = unpermute_rows(w, n_head)
    return w

  return hf.place(get_hf_tensor, cfg, layout, dtype, source=str(path))


def _dequantize(path, tensor) -> np.ndarray:
  """One tensor in numpy (= HF) order [out, in]; F32/F16 stay memory-mapped views."""
  if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
    return tensor.data
  try:
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError as e:
    raise DataError(f"{path}: tensor {tensor.name!r} has quantisation {tensor.tensor_type.name}, which "
                    f"the gguf package cannot dequantise ({e})", path=path, field=tensor.name) from e


def _field(reader, path, key, default=None):
  field = reader.get_field(key)
  if field is None:
    if default is None:
      raise DataError(f"{path}: metadata key {key!r} is missing", path=path, field=key)
    return default
  return field.contents()


def _vocab_size(reader, path, tensors) -> int:
  """Rows of the embedding table (the model's true vocab), checked against the token list."""
  if "token_embd.weight" not in tensors:
    raise DataError(f"{path}: tensor 'token_embd.weight' is missing", path=path, field="token_embd.weight")
  rows = int(tensors["token_embd.weight"].shape[-1])  # ggml order: [dim, vocab]
  tokens = reader.get_field("tokenizer.ggml.tokens")
  if tokens is not None and len(tokens.data) > rows:
    raise DataError(f"{path}: tokenizer.ggml.tokens has {len(tokens.data)} tokens but token_embd.weight "
                    f"has only {rows} rows", path=path, field="tokenizer.ggml.tokens")
  return rows


def _llama3_rope_scaling(path, cfg, tensor) -> dict:
  """LLaMA-3 rope scaling recovered from `rope_freqs.weight` (divisors of each frequency), verified."""
  factors = np.asarray(tensor.data, np.float32)
  candidate = dict(LLAMA3_ROPE, factor=float(factors.max()))
  trial = model_config(**{**cfg.to_dict(), "rope_scaling": candidate})
  unscaled = model_config(**{**cfg.to_dict(), "rope_scaling": dict(factor=0.0)})
  implied = rope_frequencies(unscaled) / rope_frequencies(trial)
  if implied.shape != factors.shape or not np.allclose(implied, factors, rtol=1e-4):
    raise DataError(f"{path}: rope_freqs.weight does not match LLaMA-3 rope scaling with "
                    f"{candidate}; this scaling is not supported", path=path, field="rope_freqs.weight")
  return candidate
