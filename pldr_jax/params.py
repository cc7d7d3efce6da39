"""One description per parameter array, driving init, counting and sharding.

`param_specs(config)` returns the parameter pytree with a
`pldr_jax.sharding.ArrayInfo` at each leaf (shape, logical axis names,
initialiser), the same description the decode caches use. `init_params` draws arrays from
it; `param_shardings` maps logical axes onto a mesh (Flax logical-axis rules,
pldr_jax.sharding); `count_params` counts without allocating anything.

The decoder layers are stacked: `params["layers"]` is one layer's tree whose
every array has a leading [L] axis (logical axis "layers"), which
`pldr_jax.model.decoder` runs with `lax.scan` (or unrolled). `unstack_layers` /
`stack_layers` convert to and from a list of per-layer trees (the published
checkpoint's layer-by-layer names, older checkpoints).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax import sharding as sharding_lib
from pldr_jax.sharding import ArrayInfo
from pldr_jax.config import PLDRConfig


Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def _w(shape, init, axes) -> ArrayInfo:
  """A weight's description: drawn by `init` in the config's param_dtype."""
  return ArrayInfo(tuple(shape), tuple(axes), init=init)


# ------------------------------------------------------------------ initialisers
# Each matches the distribution the authors' PyTorch code gives the tensor
# (torch.nn.init on a tensor of the same shape; torch Linear weights are
# [out, in], ours [in, out], so fan axes are named explicitly).

zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones
# torch.nn.Embedding's default: N(0, 1).
embedding_normal = jax.nn.initializers.normal(stddev=1.0)
# torch.nn.init.xavier_uniform_ on a Linear weight: U(+-sqrt(6 / (in + out))).
xavier_uniform = jax.nn.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=-2, out_axis=-1)
# torch.nn.Linear's default weight init, kaiming_uniform_(a=sqrt(5)):
# U(+-1/sqrt(in)) = variance 1/(3 in).
torch_linear_default = jax.nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1)
# torch.nn.init.xavier_normal_ on the whole [H, dk, dk] power-law tensor:
# torch's fans for a 3-D tensor are fan_in = size(1) * size(2) = dk*dk and
# fan_out = size(0) * size(2) = H*dk, so std = sqrt(2 / (dk*dk + H*dk))
# (untruncated normal).
xavier_normal_3d = jax.nn.initializers.variance_scaling(
    1.0, "fan_avg", "normal", in_axis=1, out_axis=0)


def torch_linear_bias(fan_in: int) -> Initializer:
  """torch.nn.Linear's default bias init: U(+-1/sqrt(fan_in)) of the layer's input width."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _dense(n_in, n_out, ax_in, ax_out, *, torch_default: bool = False):
  """A Linear layer: Xavier uniform kernel and zero bias (the authors' weights_init),
  or torch's default Linear init (torch_default=True: the authors' wv)."""
  if torch_default:
    kernel, bias = torch_linear_default, torch_linear_bias(n_in)
  else:
    kernel, bias = xavier_uniform, zeros
  return {"kernel": _w((n_in, n_out), kernel, (ax_in, ax_out)),
          "bias": _w((n_out,), bias, (ax_out,))}


def _ln(n, ax):
  return {"scale": _w((n,), ones, (ax,)), "bias": _w((n,), zeros, (ax,))}


def _glu(n, f, ax_n, ax_f):
  return {"w1": _dense(n, f, ax_n, ax_f), "w2": _dense(n, f, ax_n, ax_f),
          "w3": _dense(f, n, ax_f, ax_n)}


def layer_specs(c: PLDRConfig) -> dict:
  """One decoder layer's parameters (see docs/checkpoints.md)."""
  d, dk, h = c.d_model, c.head_dim, c.num_heads
  layer = {
      "wq": _dense(d, d, "embed", "qkv"),
      "wk": _dense(d, d, "embed", "qkv"),
      # init_recipe 'kvg': the authors' KV-G-cache code applies its init to wk
      # twice and never to wv, so wv keeps torch's default Linear init (weight
      # and bias U(+-1/sqrt(d))); 'soc' (their SOC repository's
      # pldr_model_v510.py): wv Xavier uniform with zero bias, like wq and wk.
      "wv": _dense(d, d, "embed", "qkv", torch_default=c.init_recipe == "kvg"),
      "wo": _dense(d, d, "qkv", "embed"),
      "ffn": _glu(d, c.d_ff, "embed", "mlp"),
      "ln1": _ln(d, None),
      "ln2": _ln(d, None),
  }
  if c.learned_g:
    hd = ("heads", None, None)
    layer["ln_a"] = _ln(dk, None)
    layer["res_units"] = [
        {"glu1": _glu(dk, c.a_dff, None, None), "glu2": _glu(dk, c.a_dff, None, None),
         "ln": _ln(dk, None)} for _ in range(c.num_res_units)]
    layer["plga"] = {
        "W": _w((h, dk, dk), xavier_normal_3d, hd),
        "b": _w((h, dk, dk), zeros, hd),
        "P": _w((h, dk, dk), xavier_normal_3d, hd),
        "a": _w((h, dk, dk), xavier_normal_3d, hd),
        "b_a": _w((h, dk, dk), zeros, hd),
    }
  return layer


_is_spec = sharding_lib.is_info


def _stacked(spec: ArrayInfo, n: int) -> ArrayInfo:
  return _w((n, *spec.shape), spec.init, ("layers", *spec.axes))


def param_specs(c: PLDRConfig, *, stacked: bool = True) -> dict:
  """The whole parameter tree of ArrayInfos: layers stacked on a leading [L]
  axis, or (stacked=False) a list of L per-layer trees."""
  layer = layer_specs(c)
  layers = (jax.tree.map(lambda s: _stacked(s, c.num_layers), layer, is_leaf=_is_spec)
            if stacked else [layer_specs(c) for _ in range(c.num_layers)])
  return {
      "embed": _w((c.vocab_size, c.d_model), embedding_normal, ("vocab", "embed")),
      "ln_embed": _ln(c.d_model, None),
      "layers": layers,
      "head": _dense(c.d_model, c.vocab_size, "embed", "vocab"),
  }


def map_layers(tree, fn):
  """`tree` with fn applied to the value under every 'layers' key, at any depth
  (params, or an optimizer state that mirrors them: dicts, lists, NamedTuples)."""
  if isinstance(tree, dict):
    return {k: fn(v) if k == "layers" else map_layers(v, fn) for k, v in tree.items()}
  if hasattr(tree, "_fields"):  # a NamedTuple (optax states)
    return type(tree)(*(map_layers(x, fn) for x in tree))
  if isinstance(tree, (list, tuple)):
    return type(tree)(map_layers(x, fn) for x in tree)
  return tree


def stack_trees(trees, xp=jnp):
  """Trees of one structure -> one tree whose leaves are theirs stacked on a new
  leading axis (xp.stack: jnp, or np to stay on the host). The one stacking of a
  list of trees: per-layer weights, kernels, per-layer outputs."""
  return jax.tree.map(lambda *xs: xp.stack(xs), *trees)


def stack_layers(tree, xp=jnp):
  """Every {'layers': [per-layer tree, ...]} inside `tree` (params, or an
  optimizer state that mirrors them) -> {'layers': tree of [L, ...] arrays}
  (stacked with xp.stack: jnp, or np to stay on the host)."""
  def stack(v):
    if isinstance(v, list) and v and isinstance(v[0], dict):
      return stack_trees(v, xp)
    return v
  return map_layers(tree, stack)


def num_stacked(layers) -> int:
  """L of a stacked layers tree."""
  return int(jax.tree.leaves(layers)[0].shape[0])


def layer_slice(layers, i: int):
  """Layer i of a stacked layers tree (arrays without the [L] axis)."""
  return jax.tree.map(lambda a: a[i], layers)


G_NETWORK = ("ln_a", "res_units", "plga")


def without_g_network(params: dict) -> dict:
  """params without the metric learner and power-law tensors (ln_a, res_units,
  plga): what a fixed-G model has and what decode with a G-cache reads.
  Layers stacked or listed."""
  strip = lambda layer: {k: v for k, v in layer.items() if k not in G_NETWORK}
  layers = params["layers"]
  return {**params, "layers": (strip(layers) if isinstance(layers, dict)
                               else [strip(layer) for layer in layers])}


def unstack_layers(params: dict) -> dict:
  """params with stacked layers -> the same with a list of per-layer trees."""
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return params
  return {**params, "layers": [layer_slice(layers, i) for i in range(num_stacked(layers))]}


def init_params(config: PLDRConfig, key: jax.Array) -> dict:
  """Draw every parameter with the distribution the authors' code gives it.

  Jittable with `config` static; each leaf uses fold_in(key, leaf index).
  """
  specs = param_specs(config)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
  dtype = jnp.dtype(config.param_dtype)
  arrays = [s.draw(jax.random.fold_in(key, i), dtype) for i, s in enumerate(leaves)]
  return jax.tree.unflatten(treedef, arrays)


def tree_bytes(tree) -> int:
  """Bytes of every array leaf of a pytree (arrays, or jax.ShapeDtypeStructs: shapes and
  dtypes only; leaves without a shape are skipped). The one byte count of weights,
  caches and decode states."""
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def count_params(config: PLDRConfig) -> int:
  """Number of parameters, from the specs (allocates nothing)."""
  leaves = jax.tree.leaves(param_specs(config), is_leaf=_is_spec)
  return int(sum(np.prod(s.shape) for s in leaves))


def describe_param_count(config: PLDRConfig) -> str:
  """A human-readable breakdown: total, metric learner and PLGA tensors per layer."""
  total = count_params(config)
  layer = layer_specs(config)
  sizes = lambda tree: int(sum(np.prod(s.shape) for s in jax.tree.leaves(tree, is_leaf=_is_spec)))
  learner = sizes({k: layer[k] for k in ("ln_a", "res_units") if k in layer})
  plga = sizes(layer.get("plga", {}))
  return (f"{total:,} parameters ({total / 1e6:.2f}M); per layer: metric learner "
          f"{learner:,}, power-law tensors {plga:,}; without them "
          f"{total - config.num_layers * (learner + plga):,}")


def param_shardings(config: PLDRConfig, mesh: jax.sharding.Mesh,
                    rules=sharding_lib.LOGICAL_RULES) -> dict:
  """NamedSharding per parameter from its logical axes and Flax logical-axis
  `rules`; a dimension the mesh axes do not divide stays replicated."""
  return sharding_lib.shardings(param_specs(config), mesh, rules)
