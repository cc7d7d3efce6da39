"""The inference API's structure: pldr_jax knows no plugin, any cache of the
decode-cache protocol runs, and the one sampling step runs no wasted decode step."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import struct

import pldr_jax
from pldr_jax import config as cfg
from pldr_jax.errors import InputError
from pldr_jax.inference import caches, generate as gen
from pldr_jax.params import init_params

PKG = pathlib.Path(pldr_jax.__file__).parent


def _imports(path: pathlib.Path):
  """Every module name an import statement of `path` names, at any depth."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module


def test_pldr_jax_source_imports_no_less_jax_anywhere():
  """Not at the top, not lazily inside a function: pldr_jax names no less_jax module."""
  bad = [(str(f.relative_to(PKG)), m) for f in sorted(PKG.rglob("*.py"))
         for m in _imports(f) if m == "less_jax" or m.startswith("less_jax.")]
  assert not bad, bad


@pytest.mark.slow  # a fresh interpreter
def test_importing_every_pldr_jax_module_loads_no_less_jax():
  mods = sorted("pldr_jax." + ".".join(f.relative_to(PKG).with_suffix("").parts)
                for f in PKG.rglob("*.py") if f.name != "__init__.py")
  code = ("import importlib, sys\n"
          f"for m in {mods!r}: importlib.import_module(m)\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'less_jax'))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


@struct.dataclass
class CountingCache:
  """A third-party cache: FullCache's methods, counting decode steps as they run."""
  inner: caches.FullCache = caches.FullCache()

  def abstract(self, **kw):
    return self.inner.abstract(**kw)

  def prefill(self, *a, **kw):
    return self.inner.prefill(*a, **kw)

  def step_params(self, *a, **kw):
    return self.inner.step_params(*a, **kw)

  def step(self, params, gcache, state, tokens, *, config):
    jax.debug.callback(lambda: STEPS.append(1))
    return self.inner.step(params, gcache, state, tokens, config=config)


STEPS: list = []


def test_a_protocol_cache_runs_and_no_decode_step_is_wasted():
  c = cfg.tiny()
  p = init_params(c, jax.random.key(0))
  prompts = [[5, 6, 7], [8, 9, 10, 11]]
  sampling = gen.SamplingConfig(temperature=0.9, top_p=0.9)
  want = gen.generate(p, prompts, config=c, max_new_tokens=5, sampling=sampling)
  for run in (gen.generate, lambda *a, **k: np.stack(list(gen.stream(*a, **k)), 1).tolist()):
    STEPS.clear()
    got = run(p, prompts, config=c, max_new_tokens=5, sampling=sampling, cache=CountingCache())
    jax.effects_barrier()
    assert got == want  # generate and stream: one sampling step, the same tokens
    assert len(STEPS) == 4  # 5 tokens: the prefill's logits give the first, 4 steps the rest
  STEPS.clear()
  gen.generate(p, prompts, config=c, max_new_tokens=1, cache=CountingCache())
  jax.effects_barrier()
  assert STEPS == []


def test_a_cache_outside_the_protocol_is_one_input_error():
  c = cfg.tiny()
  p = init_params(c, jax.random.key(0))
  with pytest.raises(InputError):
    gen.generate(p, [[5, 6]], config=c, max_new_tokens=2, cache="full")
