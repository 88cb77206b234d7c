"""Small shared builders for tests: layouts on the simulated devices and tiny model configs."""
from __future__ import annotations

import jax
import ml_collections
import numpy as np

from humpback_jax import sharding
from humpback_jax.config import model_config

LAYOUTS = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "fsdp_tensor": (1, 4, 2)}


def layout(shape=(1, 1, 1)) -> sharding.Layout:
  """A Layout over the first prod(shape) simulated CPU devices."""
  n = int(np.prod(shape))
  mesh_cfg = ml_collections.ConfigDict(dict(axes=sharding.MESH_AXES, shape=shape))
  return sharding.Layout(sharding.make_mesh(mesh_cfg, jax.devices()[:n]))


def tiny_config(**overrides):
  """A 2-layer GQA model small enough to compile in a second."""
  return model_config(**{**dict(vocab_size=128, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                mlp_dim=128, norm_eps=1e-5, max_seq_len=256), **overrides})


def finished_augment(workdir, candidates, config_hash: str = "") -> None:
  """`workdir/augment` as a finished augment stage leaves it: its candidates (typed records) in the
  JSONL artifact and the tfds dataset curation reads, and a manifest with both digests."""
  from pathlib import Path

  from humpback_jax.method import artifacts, sources
  workdir = Path(workdir)
  (workdir / "augment").mkdir(parents=True, exist_ok=True)
  outputs = {artifacts.CANDIDATES: artifacts.write_records(workdir / "augment" / artifacts.CANDIDATES, candidates)}
  sources.write_dataset([artifacts.as_dict(c) for c in candidates], workdir / "datasets",
                        artifacts.CANDIDATES_DATASET, kind="pairs")
  outputs[artifacts.CANDIDATES_DATASET] = artifacts.dataset_digest(workdir / "datasets", artifacts.CANDIDATES_DATASET)
  artifacts.write_manifest(workdir / "augment", stage="augment", config_hash=config_hash, counts=dict(candidates=len(candidates)),
                           outputs=outputs, seconds=0.0)
