"""humpback-jax: instruction backtranslation (Humpback) in JAX.

`humpback_jax.load(path)` opens our checkpoint, a Hugging Face folder or a GGUF file.
"""


def load(path, **kwargs):
  """Loads a model handle (see `humpback_jax.api.load`)."""
  from humpback_jax import api
  return api.load(path, **kwargs)
