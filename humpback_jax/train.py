"""Supervised fine-tuning: the optimizer, one jitted sharded train step, and the loop around it.

The step is a pure function `(state, batch) -> (state, metrics)` compiled once with explicit
in/out shardings and the state donated. The loss is summed over target tokens and divided by
their count over the whole (accumulated) batch, so k micro-batches equal one batch k times larger.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from humpback_jax import sharding
from humpback_jax.model import build, ops

PAPER_STEPS = ((3200, 500), (12800, 600), (25600, 1200), (51200, 1600))


def paper_steps(num_examples: int) -> int:
  """Steps by data size from the paper (7B table), interpolated; proportional beyond its ends."""
  sizes, steps = zip(*PAPER_STEPS)
  if num_examples <= sizes[0]:
    return max(1, round(steps[0] * num_examples / sizes[0]))
  if num_examples >= sizes[-1]:
    return round(steps[-1] * num_examples / sizes[-1])
  return int(round(np.interp(num_examples, sizes, steps)))


def paper_batch_size(train_cfg, num_examples: int) -> int:
  """The paper's batch size: 32 examples, or 8 when there are fewer than 3,000."""
  if num_examples < train_cfg.small_data_threshold:
    return train_cfg.small_data_batch_size
  return train_cfg.batch_size


def learning_rate_schedule(train_cfg, total_steps: int) -> optax.Schedule:
  """The paper's linear 1e-5 -> 9e-6 decay (optional warm-up), or a named optax schedule."""
  warmup = train_cfg.warmup_steps
  decay_steps = max(1, total_steps - warmup)
  if train_cfg.schedule == "paper_linear":
    main = optax.linear_schedule(train_cfg.learning_rate, train_cfg.end_learning_rate, decay_steps)
  elif train_cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(train_cfg.learning_rate, decay_steps,
                                       alpha=train_cfg.end_learning_rate / train_cfg.learning_rate)
  elif train_cfg.schedule == "constant":
    main = optax.constant_schedule(train_cfg.learning_rate)
  else:
    from humpback_jax.errors import ConfigError
    raise ConfigError(f"train.schedule: {train_cfg.schedule!r} is not one of paper_linear, cosine, constant")
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, train_cfg.learning_rate, warmup), main], [warmup])


def make_optimizer(train_cfg, total_steps: int) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW; no weight decay on norm scales (1-D parameters)."""
  schedule = learning_rate_schedule(train_cfg, total_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask))


def token_nll(cfg, params, batch, dropout_rng=None, layout=None, backend=ops.XLA):
  """Summed negative log-likelihood over target tokens, and their count."""
  logits, _ = build.forward(cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                            dropout_rng=dropout_rng, layout=layout, backend=backend)
  nll = cross_entropy(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def cross_entropy(logits, targets):
  """-log softmax(logits)[target]; the target logit is picked by a one-hot product, whose gradient
  is elementwise (a gather's gradient is a scatter, slow on CPU)."""
  picked = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - picked


def per_example_nll(cfg, params, batch):
  """Mean NLL of each packed example: {segment id: value} per row, as a [batch, max_segments] array."""
  logits, _ = build.forward(cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"])
  nll = cross_entropy(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  max_seg = int(np.max(np.asarray(batch["segment_ids"]))) + 1
  onehot = jax.nn.one_hot(batch["segment_ids"], max_seg) * mask[..., None]
  return jnp.einsum("bt,bts->bs", nll, onehot) / jnp.maximum(onehot.sum(1), 1.0)


@dataclasses.dataclass(frozen=True)
class StepFns:
  """The compiled pieces of training for one config and mesh."""
  init: callable
  step: callable
  state_shardings: object
  batch_sharding: object
  abstract_params: object


BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


def build_step(cfg, layout: sharding.Layout, optimizer, *, micro_batches: int = 1,
               dropout_rate: float = 0.0, seed: int = 0) -> StepFns:
  """Jitted init and train step with explicit shardings; the step donates the state it replaces.
  Its kernels are `model.backend` resolved for the layout's mesh (ops.py), fixed here."""
  model_cfg = cfg.copy_and_resolve_references()
  model_cfg.dropout_rate = dropout_rate
  backend = ops.for_model(model_cfg, layout)
  param_sh = build.param_shardings(model_cfg, layout)
  abstract_params = build.abstract_params(model_cfg)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  replicated = sharding.replicated(layout.mesh)
  opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_sh,
                                 transform_non_params=lambda _: replicated)
  state_sh = dict(step=replicated, params=param_sh, opt_state=opt_sh)
  batch_sh = layout.sharding(("batch", "length"))
  batch_shardings = {k: batch_sh for k in BATCH_KEYS}

  @functools.partial(jax.jit, in_shardings=(param_sh,), out_shardings=state_sh, donate_argnums=0)
  def init(params):
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

  def micro_grads(params, micro, rng):
    def loss_sum(p):
      return token_nll(model_cfg, p, micro, rng if dropout_rate else None, layout, backend)
    (nll, count), grads = jax.value_and_grad(loss_sum, has_aux=True)(params)
    return nll, count, grads

  @functools.partial(jax.jit, in_shardings=(state_sh, batch_shardings),
                     out_shardings=(state_sh, replicated), donate_argnums=0)
  def step(state, batch):
    params = state["params"]
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])

    def accumulate(carry, xs):
      i, mb = xs
      nll, count, grads = micro_grads(params, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (nll, count, grads)), None

    if micro_batches == 1:  # no loop: XLA fuses and schedules the whole step at once
      nll, count, grads = micro_grads(params, batch, jax.random.fold_in(rng, 0))
    else:
      micro = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), batch)
      zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
      (nll, count, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(micro_batches), micro))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_state = dict(step=state["step"] + 1, params=optax.apply_updates(params, updates),
                     opt_state=opt_state)
    metrics = dict(loss=nll / count, grad_norm=optax.tree.norm(grads), target_tokens=count,
                   tokens=jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32))
    return new_state, metrics

  return StepFns(init=init, step=step, state_shardings=state_sh, batch_sharding=batch_shardings,
                 abstract_params=abstract_params)


def put_batch(batch: dict, batch_shardings: dict, process_count: int = 1) -> dict:
  """Host numpy batch -> global sharded arrays (each process passes its own rows)."""
  if process_count == 1:
    return {k: jax.device_put(np.asarray(batch[k]), batch_shardings[k]) for k in BATCH_KEYS}
  return {k: jax.make_array_from_process_local_data(batch_shardings[k], np.asarray(batch[k]))
          for k in BATCH_KEYS}


def model_flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6 x parameters (matmuls) + 12 x layers x dim x seq (attention)."""
  d, layers = cfg.dim, cfg.num_layers
  hd = cfg.head_dim or d // cfg.num_heads
  attn = d * hd * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
  mlp = 3 * d * cfg.mlp_dim
  head = d * cfg.vocab_size
  matmul_params = layers * (attn + mlp) + head
  return 6.0 * matmul_params + 12.0 * layers * cfg.num_heads * hd * seq_len / 2


def mfu(cfg, tokens_per_s: float, seq_len: int, peak_flops_per_device: float, num_devices: int) -> float:
  """Model FLOPs utilisation against a configured per-device peak."""
  return model_flops_per_token(cfg, seq_len) * tokens_per_s / (peak_flops_per_device * num_devices)


def is_finite(x) -> bool:
  """True when a host scalar is neither NaN nor infinite."""
  return math.isfinite(float(x))
