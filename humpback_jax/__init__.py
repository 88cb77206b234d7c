"""humpback-jax: instruction backtranslation (Humpback) in JAX.

`humpback_jax.load(path)` opens our checkpoint, a Hugging Face folder or a GGUF file.
Importing the package adds our measured XLA:CPU defaults (see `xla_flags`) to XLA_FLAGS, and on a
machine without accelerators pins JAX_PLATFORMS=cpu (no failed TPU start, no libtpu error lines).
"""
from humpback_jax import xla_flags as _xla_flags

_xla_flags.pin_cpu_without_accelerator()
_xla_flags.apply_cpu_defaults()


def load(path, **kwargs):
  """Loads a model handle (see `humpback_jax.api.load`)."""
  from humpback_jax import api
  return api.load(path, **kwargs)
