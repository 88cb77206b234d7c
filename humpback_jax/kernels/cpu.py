"""Our XLA:CPU kernels (the `*.cc` files here, one per family), built on first use and called
through XLA's FFI.

A decode step is a few rows times every weight, plus one query per row over the KV cache;
XLA:CPU's Eigen GEMM and batched dot run those shapes far below the memory bandwidth that bounds
them (bench/RESULTS.md). Whole float32 sequences (the train step, prefill, scoring) use a packed
GEMM, a whole-sequence attention and a one-pass RMSNorm (each forward and backward) instead of
Eigen's GEMM, XLA's masked softmax around batched dots and its split reductions. Greedy decoding
picks its tokens with `greedy_head`, which computes only the logits an 8-bit bound cannot rule out
(where the CPU has AVX-512 VNNI). The C++ source (AVX2/FMA) is compiled once per machine with the
system C++ compiler against the FFI headers jaxlib ships, into `~/.cache/humpback_jax/kernels/` (or
`$HUMPBACK_KERNEL_CACHE`), keyed by the source, compiler, jaxlib and CPU. Without a compiler or
AVX2, or with `HUMPBACK_CPU_KERNELS=0`, `available()` is False and `model/ops.py` (the one place
that calls these) keeps the plain-XLA path; it also decides where each kernel applies.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

# One file per kernel family (kernels/README.md), compiled together into one library.
SOURCES = tuple(sorted(Path(__file__).parent.glob("*.cc")))
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))
TARGETS = ("HumpbackPackedMatmul", "HumpbackPackedSwigluMatmul", "HumpbackPackWeightStrips",
           "HumpbackDecodeAttention", "HumpbackDecodeAttentionStep", "HumpbackGemm",
           "HumpbackAttentionForward", "HumpbackAttentionBackward",
           "HumpbackRmsNormForward", "HumpbackRmsNormBackward", "HumpbackArgmax",
           "HumpbackGreedyHeadTables", "HumpbackGreedyHead")
STRIP = 16  # columns per packed strip of a weight (common.h: kStrip)
MAX_ROWS = 64  # larger decode batches keep XLA's GEMM
# -ffp-contract=off: no implicit FMAs (the kernels write theirs; rotary must round as transformers does)
COMPILE_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w")


def _cache_dir() -> Path:
  return Path(os.environ.get("HUMPBACK_KERNEL_CACHE", Path.home() / ".cache" / "humpback_jax" / "kernels"))


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


@functools.cache
def _cpu_flags() -> frozenset[str]:
  """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return frozenset()
  flags = (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
  return frozenset(next(flags, ()))


def build(compiler: str) -> Path:
  """Compiles the kernels (once per source, compiler, jaxlib and CPU) and returns the shared library."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  parts = [*(f.read_text() for f in SOURCES + HEADERS), version, jaxlib.__version__, *COMPILE_FLAGS,
           *sorted(_cpu_flags())]
  library = _cache_dir() / f"humpback_kernels-{hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:16]}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
    partial = Path(tmp) / library.name
    command = [compiler, *COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"compiling the kernels failed ({' '.join(command)}):\n{done.stderr[-4000:]}")
    os.replace(partial, library)  # atomic: concurrent processes never load half a file
  return library


@functools.cache
def _library() -> ctypes.CDLL | None:
  """The kernels' shared library, built and its targets registered for XLA:CPU; None where they
  cannot run (the reason printed once)."""
  if os.environ.get("HUMPBACK_CPU_KERNELS", "1") == "0":
    return None
  if platform.machine().lower() not in ("x86_64", "amd64") or not {"avx2", "fma"} <= _cpu_flags():
    return None
  compiler = _compiler()
  if compiler is None:
    print("humpback_jax: no C++ compiler found; CPU decoding uses plain XLA (slower)", file=sys.stderr)
    return None
  try:
    library = ctypes.cdll.LoadLibrary(str(build(compiler)))
  except (RuntimeError, OSError) as e:
    print(f"humpback_jax: CPU decode kernels unavailable, using plain XLA: {e}", file=sys.stderr)
    return None
  for name in TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
  return library


def available() -> bool:
  """True when the kernels are built and registered for XLA:CPU."""
  return _library() is not None


def _packed_strips(w_kn):
  """w [k, n] packed into 16-column strips [ceil(n / 16), k, 16], zero-padded.

  The packing (a kernel: XLA's transpose was slow) sits behind an optimization barrier:
  XLA hoists the barrier (and the packing before it) out of a while loop, so a decode loop packs
  each weight once, not every step.
  """
  k, n = w_kn.shape
  packed = jax.ShapeDtypeStruct((-(-n // STRIP), k, STRIP), jnp.float32)
  return jax.lax.optimization_barrier(jax.ffi.ffi_call("HumpbackPackWeightStrips", packed)(w_kn))


def small_matmul(x_mk, w_kn):
  """x [m, k] @ w [k, n] -> [m, n] float32 for few rows, through the packed-strip kernel."""
  n = w_kn.shape[1]
  strips = _packed_strips(w_kn)
  out = jax.ShapeDtypeStruct((x_mk.shape[0], strips.shape[0] * STRIP), jnp.float32)
  y = jax.ffi.ffi_call("HumpbackPackedMatmul", out)(x_mk, strips)
  return y[:, :n] if n % STRIP else y


def small_swiglu_matmul(x_mk, w_kf2):
  """silu(x @ w[..., 0]) * (x @ w[..., 1]) -> [m, f] float32 for few rows; w [k, f, 2] is the gate
  and up weights stacked last, so SwiGLU runs in the matmul's epilogue (one kernel, no [m, 2f]
  product written and read back)."""
  k, f, _ = w_kf2.shape
  out = jax.ShapeDtypeStruct((x_mk.shape[0], f), jnp.float32)
  return jax.ffi.ffi_call("HumpbackPackedSwigluMatmul", out)(x_mk, _packed_strips(w_kf2.reshape(k, 2 * f)))


def argmax(x_rn):
  """First index of each row's maximum [rows] int32, a NaN counting as the maximum (as jnp.argmax)."""
  return jax.ffi.ffi_call("HumpbackArgmax", jax.ShapeDtypeStruct(x_rn.shape[:1], jnp.int32))(x_rn)


GREEDY_HEAD_MIN_VOCAB = 8192  # smaller heads cost little next to the layers: the plain matmul + argmax


def greedy_head_built() -> bool:
  """Whether this machine's kernels include the greedy head: they do where the compiler targets
  AVX-512 VNNI (with AVX2 alone its 8-bit pass would be slower than every logit in float32)."""
  return available() and bool(_library().HumpbackGreedyHeadBuilt())


def greedy_head_tables(w_nk):
  """The tables of a head w [k, n], given as w^T [n, k], that `greedy_head` bounds its logits with
  (built once per decode loop): 8-bit column codes [ceil(n / 16), ceil(k / 4), 16, 4], w's float32
  strips [ceil(n / 16), k, 16], per-column stats, offsets, and max |w| (infinite or NaN where w is not
  finite)."""
  n, k = w_nk.shape
  strips = -(-n // STRIP)
  outs = (jax.ShapeDtypeStruct((strips, -(-k // 4), STRIP, 4), jnp.int8),
          jax.ShapeDtypeStruct((strips, k, STRIP), jnp.float32),
          jax.ShapeDtypeStruct((strips, 4, STRIP), jnp.float32),
          jax.ShapeDtypeStruct((strips, STRIP), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.float32))
  return jax.ffi.ffi_call("HumpbackGreedyHeadTables", outs)(w_nk)


def greedy_head(x_mk, tables, w_nk):
  """argmax over the vocabulary of x [m, k] @ w, w^T = w_nk [n, k]: the token that `argmax(small_matmul(x, w))`
  picks, bit for bit, computing only the logits that an 8-bit pass over `tables` cannot rule out."""
  out = jax.ShapeDtypeStruct(x_mk.shape[:1], jnp.int32)
  return jax.ffi.ffi_call("HumpbackGreedyHead", out)(x_mk, *tables, w_nk)


def decode_attention(q_bkgd, k_bskd, v_bskd, visible_bs, scale: float):
  """Single-query attention: q [b, kv, group, d] over a [b, s, kv, d] cache, visible slots [b, s]."""
  out = jax.ShapeDtypeStruct(q_bkgd.shape, jnp.float32)
  return jax.ffi.ffi_call("HumpbackDecodeAttention", out)(
      q_bkgd, k_bskd, v_bskd, visible_bs.astype(jnp.int32), scale=np.float32(scale))


def decode_attention_step(qkv_bkxd, cos_bd, sin_bd, k_bskd, v_bskd, index, visible_bs, scale: float):
  """One decode step's attention from the fused projection qkv [b, kv, g + 2, d] (g query heads, then
  k, then v, per KV head; before rotary) with cos/sin [b, d] at the new position: rotates q and k,
  writes k and v at slot `index` of the [b, s, kv, d] caches (in place) and attends over the visible
  slots [b, s]. Returns (out [b, kv, g, d], cache k, cache v)."""
  b, kv, x, d = qkv_bkxd.shape
  outs = (jax.ShapeDtypeStruct((b, kv, x - 2, d), jnp.float32), jax.ShapeDtypeStruct(k_bskd.shape, jnp.float32),
          jax.ShapeDtypeStruct(v_bskd.shape, jnp.float32))
  call = jax.ffi.ffi_call("HumpbackDecodeAttentionStep", outs, input_output_aliases={3: 1, 4: 2})
  return call(qkv_bkxd, cos_bd, sin_bd, k_bskd, v_bskd, jnp.asarray(index, jnp.int32),
              visible_bs.astype(jnp.int32), scale=np.float32(scale))


def gemm(a, b, transpose_a: bool = False, transpose_b: bool = False):
  """op(a) @ op(b) for 2-D float32 a and b through the packed GEMM kernel; op transposes when asked."""
  m = a.shape[1] if transpose_a else a.shape[0]
  n = b.shape[0] if transpose_b else b.shape[1]
  out = jax.ShapeDtypeStruct((m, n), jnp.float32)
  return jax.ffi.ffi_call("HumpbackGemm", out)(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


@jax.custom_vjp
def matmul(x, w):
  """x [m, k] @ w [k, n] in float32 through the GEMM kernel, with its gradients through it too."""
  return gemm(x, w)


def _matmul_fwd(x, w):
  return gemm(x, w), (x, w)


def _matmul_bwd(residuals, dy):
  x, w = residuals
  return gemm(dy, w, transpose_b=True), gemm(x, dy, transpose_a=True)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def sequence_attention(q_btnd, k_bskd, v_bskd, mask_bts, scale: float):
  """Attention of whole sequences (no cache): q [b, t, heads, d], k/v [b, s, kv, d], mask [b, t, s].

  softmax(q k^T * scale, masked) v per KV group; a query with no visible key averages all keys, as
  XLA's softmax over all-masked logits does. The forward saves each query's log-sum-exp; the
  backward re-derives the probabilities from it.
  """
  return _attention_forward(q_btnd, k_bskd, v_bskd, mask_bts, scale)[0]


def _attention_forward(q, k, v, mask, scale):
  b, t, n, _ = q.shape
  outs = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, n, t), jnp.float32))
  return jax.ffi.ffi_call("HumpbackAttentionForward", outs)(q, k, v, mask, scale=np.float32(scale))


def _attention_fwd(q, k, v, mask, scale):
  out, lse = _attention_forward(q, k, v, mask, scale)
  return out, (q, k, v, mask, out, lse)


def _attention_bwd(scale, residuals, dout):
  q, k, v, mask, out, lse = residuals
  outs = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  dq, dk, dv = jax.ffi.ffi_call("HumpbackAttentionBackward", outs)(q, k, v, mask, out, lse, dout,
                                                                  scale=np.float32(scale))
  return dq, dk, dv, None


sequence_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, scale, eps: float):
  """x [..., d] / sqrt(mean(x^2) + eps) * scale [d] in float32, forward and backward in one pass each."""
  return _rms_norm_forward(x, scale, eps)[0]


def _rms_norm_forward(x, scale, eps):
  x2d = x.reshape(-1, x.shape[-1])
  outs = (jax.ShapeDtypeStruct(x2d.shape, jnp.float32), jax.ShapeDtypeStruct(x2d.shape[:1], jnp.float32))
  y, inv_rms = jax.ffi.ffi_call("HumpbackRmsNormForward", outs)(x2d, scale, eps=np.float32(eps))
  return y.reshape(x.shape), inv_rms


def _rms_norm_fwd(x, scale, eps):
  y, inv_rms = _rms_norm_forward(x, scale, eps)
  return y, (x, scale, inv_rms)


def _rms_norm_bwd(eps, residuals, dy):
  x, scale, inv_rms = residuals
  x2d = x.reshape(-1, x.shape[-1])
  outs = (jax.ShapeDtypeStruct(x2d.shape, jnp.float32), jax.ShapeDtypeStruct(scale.shape, jnp.float32))
  dx, dscale = jax.ffi.ffi_call("HumpbackRmsNormBackward", outs)(x2d, scale, inv_rms, dy.reshape(x2d.shape))
  return dx.reshape(x.shape), dscale


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)
