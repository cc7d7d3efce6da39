"""Logical axes -> mesh axes, with Flax's logical-axis rules (as MaxText).

Every array the library places on a mesh is described once, by an `ArrayInfo`
(shape, logical axis names, and a dtype or an initialiser): the parameters
(`pldr_jax.params.param_specs`) and the decode caches (the `abstract()` of
KVCache / GCache, and of a plugin's caches such as less_jax's). One table,
`LOGICAL_RULES`, maps those names onto the mesh ('data', 'fsdp'):

  batch     -> ('data', 'fsdp')   sequences of a batch (training and decode)
  embed     -> 'fsdp'             weights' model dimension (ZeRO-3 style)
  everything else (layers, heads, head_dim, cache_seq, vocab, mlp, qkv, ...)
            -> replicated

A rule whose mesh axes do not divide the dimension is dropped for that array
(it stays replicated), so one table serves any mesh from 1 device to a pod.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("layers", None),
    ("vocab", None),
    ("qkv", None),
    ("mlp", None),
    ("heads", None),
    ("head_dim", None),
    ("cache_seq", None),
    ("rank", None),
)


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
  """One array, described once: shape; axes, a logical axis name (or None) per
  dimension; dtype, fixed for a cache field (None for a weight, drawn in the
  config's param_dtype); init, a weight's `jax.nn.initializers` callable
  (key, shape, dtype) -> array (None for a cache field, zeros).

  A stacked layer weight has axes[0] == "layers": `draw` then draws each layer
  separately (the fans are those of one layer's tensor)."""
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  dtype: Any = None
  init: Callable | None = None

  def draw(self, key: jax.Array, dtype=None) -> jax.Array:
    dtype = self.dtype if dtype is None else dtype
    if self.init is None:
      return jax.numpy.zeros(self.shape, dtype)
    if self.axes[:1] == ("layers",):
      keys = jax.random.split(key, self.shape[0])
      return jax.vmap(lambda k: self.init(k, self.shape[1:], dtype))(keys)
    return self.init(key, self.shape, dtype)


def is_info(x) -> bool:
  return isinstance(x, ArrayInfo)


def shardings(infos, mesh: jax.sharding.Mesh, rules=None):
  """NamedSharding per leaf of a tree of ArrayInfo, from its logical axes."""
  rules = LOGICAL_RULES if rules is None else rules
  return jax.tree.map(lambda i: logical_sharding(i.shape, i.axes, mesh, rules), infos,
                      is_leaf=is_info)


def zeros(infos):
  """Zero arrays for a tree of ArrayInfo (their dtypes)."""
  return jax.tree.map(lambda i: jax.numpy.zeros(i.shape, i.dtype), infos, is_leaf=is_info)


def logical_spec(shape: Sequence[int], axes: Sequence[str | None], mesh: jax.sharding.Mesh,
                 rules=LOGICAL_RULES) -> jax.sharding.PartitionSpec:
  """PartitionSpec of an array [*shape] with logical `axes` under `rules`; a
  dimension its mesh axes do not divide stays replicated."""
  if len(shape) != len(axes):
    raise ValueError(f"{len(axes)} logical axes {tuple(axes)} for a {len(shape)}-d shape "
                     f"{tuple(shape)}")
  spec = nn.logical_to_mesh_axes(tuple(axes), rules)
  out = []
  for dim, mesh_ax in zip(shape, spec):
    names = () if mesh_ax is None else (mesh_ax,) if isinstance(mesh_ax, str) else mesh_ax
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    out.append(mesh_ax if names and dim % size == 0 else None)
  return jax.sharding.PartitionSpec(*out)


def logical_sharding(shape, axes, mesh: jax.sharding.Mesh,
                     rules=LOGICAL_RULES) -> jax.sharding.NamedSharding:
  """NamedSharding of `logical_spec`."""
  return jax.sharding.NamedSharding(mesh, logical_spec(shape, axes, mesh, rules))


def batch_partition(mesh) -> tuple[str, ...] | str | None:
  """The mesh axes a batch dimension is split over under LOGICAL_RULES (the
  'batch' rule, keeping the axes this mesh has)."""
  rule = dict(LOGICAL_RULES)["batch"]
  axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
  axes = tuple(a for a in axes if a in mesh.axis_names)
  return axes if len(axes) > 1 else (axes[0] if axes else None)


def kernel_mesh(attention: str, mesh):
  """The abstract mesh a custom attention kernel splits its batch over
  (`plga.flash_attention` runs per shard under `jax.shard_map`; XLA cannot
  partition a Mosaic kernel); a no-op for attention XLA partitions by itself,
  or without a mesh."""
  import contextlib
  if attention != "flash" or mesh is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
