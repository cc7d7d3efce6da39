"""One description per parameter array, driving init, counting and sharding.

`param_specs(config)` returns the parameter pytree with a `ParamSpec` at each
leaf (shape, initialiser, logical axis names). `init_params` draws arrays from
it; `param_shardings` maps logical axes onto a mesh; `count_params` counts
without allocating anything.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax.config import PLDRConfig


Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """shape; init: a `jax.nn.initializers` callable (key, shape, dtype) -> array;
  axes: a logical axis name (or None) per dimension."""
  shape: tuple[int, ...]
  init: Initializer
  axes: tuple[str | None, ...]


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
  return {"kernel": ParamSpec((n_in, n_out), kernel, (ax_in, ax_out)),
          "bias": ParamSpec((n_out,), bias, (ax_out,))}


def _ln(n, ax):
  return {"scale": ParamSpec((n,), ones, (ax,)), "bias": ParamSpec((n,), zeros, (ax,))}


def _glu(n, f, ax_n, ax_f):
  return {"w1": _dense(n, f, ax_n, ax_f), "w2": _dense(n, f, ax_n, ax_f),
          "w3": _dense(f, n, ax_f, ax_n)}


def layer_specs(c: PLDRConfig) -> dict:
  """One decoder layer's parameters (see docs/checkpoints.md)."""
  d, dk, h = c.d_model, c.head_dim, c.num_heads
  layer = {
      "wq": _dense(d, d, "embed", "qkv"),
      "wk": _dense(d, d, "embed", "qkv"),
      # The authors' code applies its init to wk twice and never to wv, so wv
      # keeps torch's default Linear init (weight and bias U(+-1/sqrt(d))).
      "wv": _dense(d, d, "embed", "qkv", torch_default=True),
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
        "W": ParamSpec((h, dk, dk), xavier_normal_3d, hd),
        "b": ParamSpec((h, dk, dk), zeros, hd),
        "P": ParamSpec((h, dk, dk), xavier_normal_3d, hd),
        "a": ParamSpec((h, dk, dk), xavier_normal_3d, hd),
        "b_a": ParamSpec((h, dk, dk), zeros, hd),
    }
  return layer


def param_specs(c: PLDRConfig) -> dict:
  """The whole parameter tree of ParamSpecs."""
  return {
      "embed": ParamSpec((c.vocab_size, c.d_model), embedding_normal, ("vocab", "embed")),
      "ln_embed": _ln(c.d_model, None),
      "layers": [layer_specs(c) for _ in range(c.num_layers)],
      "head": _dense(c.d_model, c.vocab_size, "embed", "vocab"),
  }


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def init_params(config: PLDRConfig, key: jax.Array) -> dict:
  """Draw every parameter with the distribution the authors' code gives it.

  Jittable with `config` static; each leaf uses fold_in(key, leaf index).
  """
  specs = param_specs(config)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
  dtype = jnp.dtype(config.param_dtype)
  arrays = [s.init(jax.random.fold_in(key, i), s.shape, dtype) for i, s in enumerate(leaves)]
  return jax.tree.unflatten(treedef, arrays)


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


# Logical axis -> mesh axis. 'fsdp' shards weights along their embed dimension;
# everything else is replicated. Batch is sharded over ('data', 'fsdp').
DEFAULT_RULES: Mapping[str, Any] = {"embed": "fsdp", "vocab": None, "qkv": None,
                                    "mlp": None, "heads": None}


def param_shardings(config: PLDRConfig, mesh: jax.sharding.Mesh,
                    rules: Mapping[str, Any] = DEFAULT_RULES) -> dict:
  """NamedSharding per parameter; a dimension the mesh axis does not divide stays replicated."""
  def one(spec: ParamSpec):
    names = []
    for dim, ax in zip(spec.shape, spec.axes):
      mesh_ax = rules.get(ax) if ax is not None else None
      if mesh_ax is not None and dim % mesh.shape[mesh_ax]:
        mesh_ax = None
      names.append(mesh_ax)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*names))
  return jax.tree.map(one, param_specs(config), is_leaf=_is_spec)
