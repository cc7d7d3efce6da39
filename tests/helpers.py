"""Shared test inputs."""

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax import model


def perturbed_params(c, seed=0):
  """init_params with non-zero b / b_a so zero init cannot hide a bug."""
  p = model.init_params(c, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  for layer in p["layers"]:
    if "plga" in layer:
      for name in ("b", "b_a"):
        layer["plga"][name] = jnp.asarray(
            0.05 * rng.standard_normal(layer["plga"][name].shape), layer["plga"][name].dtype)
  return p


def random_tokens(c, shape, seed=1):
  """Token ids in [4, vocab): no special tokens."""
  return jnp.asarray(np.random.default_rng(seed).integers(4, c.vocab_size, shape), jnp.int32)


def load_script(relpath: str, name: str | None = None, *, once: bool = False):
  """A repo script (e.g. 'experiments/less_eval.py') imported as a module.

  once=True: registered in sys.modules under `name` and reused (a script whose
  gin configurables may only be registered once per process).
  """
  import importlib.util
  import sys
  from pathlib import Path
  path = Path(__file__).resolve().parents[1] / relpath
  name = name or path.stem
  if once and name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if once:
    sys.modules[name] = mod
  return mod
