"""Building the model: abstract shapes, parameters created straight onto their shardings,
and the pure forward function that every jitted program of ours calls.

Parameters travel as a plain nested dict of arrays (`nnx.to_pure_dict`), so optax, orbax and the
weight converters see an ordinary pytree; `forward` merges them back into the NNX module.
"""
from __future__ import annotations

import functools

import jax
import ml_collections
from flax import nnx

from humpback_jax import sharding
from humpback_jax.config import frozen, validate_model
from humpback_jax.model import ops
from humpback_jax.model.llama import Llama


@functools.lru_cache(maxsize=32)
def _abstract(cfg: ml_collections.FrozenConfigDict):
  model = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))
  return nnx.split(model)


def abstract_model(cfg):
  """(graphdef, abstract nnx.State) of the model: shapes and metadata only, no memory."""
  validate_model(cfg)
  return _abstract(frozen(cfg))


def abstract_params(cfg):
  """The parameter pytree as ShapeDtypeStructs."""
  return nnx.to_pure_dict(abstract_model(cfg)[1])


def param_shardings(cfg, layout: sharding.Layout):
  """NamedSharding for every parameter, from its logical axes and the layout's rules."""
  _, state = abstract_model(cfg)
  return nnx.to_pure_dict(sharding.state_shardings(state, layout))


def param_logical_axes(cfg):
  """Logical axis names of every parameter (a pytree of tuples)."""
  _, state = abstract_model(cfg)
  return nnx.to_pure_dict(sharding.logical_axes(state))


def init_params(cfg, layout: sharding.Layout, seed: int = 0):
  """Random parameters, created directly in their shardings (never whole on one device)."""
  sharding.validate_model_on_mesh(cfg, layout.mesh)
  shardings = param_shardings(cfg, layout)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.to_pure_dict(nnx.state(Llama(cfg, nnx.Rngs(seed))))

  return init()


def _model(cfg, params) -> Llama:
  graphdef, state = abstract_model(cfg)
  state = jax.tree.map(lambda x: x, state)  # a fresh copy to fill
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def forward(cfg, params, tokens, positions=None, segment_ids=None, *, cache=None,
            dropout_rng=None, layout=None, hidden_only: bool = False, backend=ops.XLA):
  """Pure forward pass: params dict + tokens [batch, len] -> (float32 logits, cache); with
  `hidden_only`, the final-normed hidden states [batch, len, dim] instead of the logits.
  `backend` (ops.Backend) picks the kernels: plain XLA unless the caller resolved another."""
  return _model(cfg, params)(tokens, positions, segment_ids, cache=cache, dropout_rng=dropout_rng,
                             layout=layout, hidden_only=hidden_only, backend=backend)


def head_weight(cfg, params):
  """The output projection [dim, vocab] (logits = final-normed hidden states @ it)."""
  return _model(cfg, params).head_weight()
