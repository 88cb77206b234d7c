"""The one backend seam: dense layers, RMSNorm, attention and the greedy head pick their kernels here.

A `Backend` is an explicit value, resolved once from the config (`model.backend`) and the mesh's
device platform when a train step or an engine is built, then passed down to every layer:
  xla          plain XLA ops (CPU-tuned attention forms on CPU, `jax.nn.dot_product_attention` elsewhere)
  cpu_kernels  our XLA:CPU FFI kernels (kernels/cpu.py) where they apply, XLA for the rest
  pallas_tpu   JAX's Pallas splash attention for whole sequences (interpret mode off TPU), XLA for decode
  cudnn        cuDNN's flash attention through `jax.nn.dot_product_attention` on NVIDIA GPUs
`auto` picks cpu_kernels on CPU (xla where they cannot build), pallas_tpu on TPU and cudnn on GPU.
Nothing here asks JAX which backend is the default, so a CPU host compiles TPU programs unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from humpback_jax import config
from humpback_jax.errors import ConfigError
from humpback_jax.kernels import cpu as cpu_kernels
from humpback_jax.model import attention

CHOICES = config.BACKENDS  # "auto" and the kinds below
KINDS = tuple(name for name in CHOICES if name != "auto")
_AUTO = {"cpu": "cpu_kernels", "tpu": "pallas_tpu", "gpu": "cudnn", "cuda": "cudnn"}


@dataclasses.dataclass(frozen=True)
class Backend:
  """Which kernels a program uses. `whole_sequences`: the CPU kernels may take whole sequences (a
  one-device mesh: under a sharded one XLA would gather their operands); `decode_loop`: inside a
  decode while loop (few rows per matmul, weights packed once); `layout`: the mesh splash runs over."""
  kind: str = "xla"
  platform: str = "cpu"
  whole_sequences: bool = False
  decode_loop: bool = False
  layout: Any = None

  def in_decode_loop(self) -> "Backend":
    """The same backend inside a decode while loop."""
    return dataclasses.replace(self, decode_loop=True, whole_sequences=False)

  @property
  def interpret(self) -> bool:
    """Pallas kernels run in interpret mode off TPU (tests on CPU)."""
    return self.platform != "tpu"


XLA = Backend()  # plain XLA with the CPU-tuned attention forms: what an unsharded forward gets by default


def resolve(name: str, layout) -> Backend:
  """The backend `name` (one of CHOICES) means on `layout`'s mesh; fails naming `model.backend`."""
  platform = layout.mesh.devices.flat[0].platform
  if name not in CHOICES:
    raise ConfigError(f"model.backend: {name!r} is not one of {CHOICES}")
  kind = _AUTO.get(platform, "xla") if name == "auto" else name
  if kind == "cpu_kernels" and platform != "cpu":
    raise ConfigError(f"model.backend: cpu_kernels run on CPU only, this mesh is on {platform}")
  if kind == "cpu_kernels" and not cpu_kernels.available():
    if name != "auto":
      raise ConfigError("model.backend: the CPU kernels cannot run here (see the message above); "
                        "use model.backend='xla'")
    kind = "xla"
  if kind == "cudnn" and platform not in ("gpu", "cuda"):
    raise ConfigError(f"model.backend: cudnn needs an NVIDIA GPU mesh, this one is on {platform}")
  return Backend(kind=kind, platform=platform, whole_sequences=layout.mesh.devices.size == 1, layout=layout)


def for_model(model_cfg, layout) -> Backend:
  """The backend of a model config (`model.backend`, `auto` when a stored config predates it)."""
  return resolve(model_cfg.get("backend", "auto"), layout)


def _cpu(backend: Backend, *arrays) -> bool:
  return backend.kind == "cpu_kernels" and all(a.dtype == jnp.float32 for a in arrays)


def dense(x, w, backend: Backend = XLA, in_dims: int = 1, out_dtype=None):
  """x [..., *w.shape[:in_dims]] @ w -> [..., *w.shape[in_dims:]] as one 2-D matmul.

  Leading dims are flattened first: XLA:CPU then keeps every operand in the row-major layout its
  GEMM wants, where a 3-D einsum's backward makes slow transposed copies (bench/RESULTS.md).
  """
  lead = x.shape[:x.ndim - in_dims]
  k = int(np.prod(w.shape[:in_dims]))
  x2d, w2d = x.reshape(-1, k), w.reshape(k, -1).astype(x.dtype)
  if _cpu(backend, x2d, w2d) and backend.decode_loop and x2d.shape[0] <= cpu_kernels.MAX_ROWS:
    y = cpu_kernels.small_matmul(x2d, w2d)  # decoding: a few rows times every weight, packed once
  elif _cpu(backend, x2d, w2d) and backend.whole_sequences:
    y = cpu_kernels.matmul(x2d, w2d)  # the float32 train step, prefill and scoring on one device
  else:
    y = jnp.dot(x2d, w2d, preferred_element_type=out_dtype)
  return y.reshape(*lead, *w.shape[in_dims:])


def swiglu(x, gate_up, backend: Backend = XLA):
  """silu(x @ gate) * (x @ up) for gate_up [dim, mlp, 2]: one GEMM for both (each device keeps its
  own mlp columns); in a CPU decode loop SwiGLU runs in the matmul kernel's epilogue."""
  x2d = x.reshape(-1, x.shape[-1])
  gate_up = gate_up.astype(x.dtype)
  if _cpu(backend, x2d, gate_up) and backend.decode_loop and x2d.shape[0] <= cpu_kernels.MAX_ROWS:
    return cpu_kernels.small_swiglu_matmul(x2d, gate_up).reshape(*x.shape[:-1], -1)
  gate, up = _split_pair(dense(x, gate_up, backend))
  return jax.nn.silu(gate) * up


@jax.custom_vjp
def _split_pair(y):
  """[..., n, 2] -> y[..., 0], y[..., 1]; the gradient is one stack (not two padded slices added)."""
  return y[..., 0], y[..., 1]


def _split_pair_fwd(y):
  return _split_pair(y), None


def _split_pair_bwd(_, grads):
  return (jnp.stack(grads, axis=-1),)


_split_pair.defvjp(_split_pair_fwd, _split_pair_bwd)


def rms_norm(x, scale, eps: float, backend: Backend = XLA):
  """x / rms(x) * scale, normalised in float32 as Hugging Face does (one-pass kernel on CPU)."""
  if _cpu(backend, x, scale) and (backend.whole_sequences or backend.decode_loop):
    return cpu_kernels.rms_norm(x, scale, eps)
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * x32.astype(x.dtype)


def sequence_attention(q_btnh, k_bsnh, v_bsnh, mask: attention.Mask, backend: Backend = XLA):
  """Attention of many queries per row (training, prefill, scoring): [b, t, heads, d] out."""
  if backend.kind == "pallas_tpu" and mask.causal_by_index:
    from humpback_jax.model import splash
    return splash.attention(q_btnh, k_bsnh, v_bsnh, mask.q_segment, mask.kv_segment,
                            layout=backend.layout, interpret=backend.interpret)
  if backend.kind == "cudnn":
    return jax.nn.dot_product_attention(q_btnh, k_bsnh, v_bsnh, mask=mask.dense, implementation="cudnn")
  if _cpu(backend, q_btnh, k_bsnh, v_bsnh) and backend.whole_sequences and q_btnh.shape[1] > 1:
    return cpu_kernels.sequence_attention(q_btnh, k_bsnh, v_bsnh, mask.dense[:, 0], q_btnh.shape[-1] ** -0.5)
  return attention.xla_attention(q_btnh, k_bsnh, v_bsnh, mask, cpu_forms=backend.platform == "cpu")


def decode_attention(q_b1nh, k_bsnh, v_bsnh, mask: attention.Mask, backend: Backend = XLA):
  """One query per row over a KV cache [b, s, kv_heads, d]: our CPU kernel, else XLA.

  JAX's TPU paged/ragged attention kernels want a paged cache whose valid tokens start at slot 0;
  ours is one contiguous left-padded buffer per row, so TPU and GPU decode with XLA's attention.
  """
  b, _, n, d = q_b1nh.shape
  if _cpu(backend, q_b1nh, k_bsnh, v_bsnh) and d % 8 == 0:
    q = q_b1nh.reshape(b, k_bsnh.shape[2], -1, d)
    return cpu_kernels.decode_attention(q, k_bsnh, v_bsnh, mask.dense[:, 0, 0, :], d ** -0.5).reshape(b, 1, n, d)
  return attention.xla_attention(q_b1nh, k_bsnh, v_bsnh, mask, cpu_forms=backend.platform == "cpu")


def fuses_decode_step(qkv, cache_k, cache_v, backend: Backend) -> bool:
  """Whether a decode loop's layer rotates, writes its cache and attends in one CPU kernel call:
  one new token per row, float32, head_dim a multiple of 16."""
  return (_cpu(backend, qkv, cache_k, cache_v) and backend.decode_loop and qkv.ndim == 5 and qkv.shape[1] == 1
          and qkv.shape[-1] % 16 == 0)


def decode_attention_step(qkv_b1kxd, cos_b1d, sin_b1d, cache_k, cache_v, index, mask: attention.Mask):
  """The fused CPU decode step (see `fuses_decode_step`): (out [b, 1, heads, d], cache k, cache v)."""
  b, _, _, _, d = qkv_b1kxd.shape
  out, cache_k, cache_v = cpu_kernels.decode_attention_step(
      qkv_b1kxd[:, 0], cos_b1d[:, 0], sin_b1d[:, 0], cache_k, cache_v, index, mask.dense[:, 0, 0], d ** -0.5)
  return out.reshape(b, 1, -1, d), cache_k, cache_v


def argmax(logits_bv, backend: Backend = XLA):
  """First index of each row's maximum [b] int32 (a NaN counts as the maximum, as jnp.argmax)."""
  if _cpu(backend, logits_bv) and backend.decode_loop and logits_bv.ndim == 2:
    return cpu_kernels.argmax(logits_bv)  # one vectorised pass, not XLA's variadic reduce
  return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)


def greedy_head_tables(head_nk, backend: Backend):
  """Tables for `greedy_head` of a transposed head [vocab, dim], or None where the plain head serves
  (not the CPU kernels, a small or non-float32 head, or a CPU without AVX-512 VNNI)."""
  if (_cpu(backend, head_nk) and head_nk.ndim == 2 and head_nk.shape[0] >= cpu_kernels.GREEDY_HEAD_MIN_VOCAB
          and cpu_kernels.greedy_head_built()):
    return cpu_kernels.greedy_head_tables(head_nk)
  return None


def greedy_head(hidden_bk, tables, head_nk):
  """argmax over the vocabulary of hidden @ head, computing only the logits that could be the largest."""
  return cpu_kernels.greedy_head(hidden_bk, tables, head_nk)
