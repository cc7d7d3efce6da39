"""pldr_jax.training.host.retain_freed_memory: a steady-state XLA:CPU call faults no fresh pages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A training-like loop: a jitted step with a donated state and 256 MiB of temporaries,
# called 10 times; reports the page faults of the last 3 calls, in MiB. A short pause
# after each call stands for a training loop's own work between steps. The product has
# a short inner dimension (64): the temporaries are as large, the arithmetic is cheap.
PROBE = r"""
import functools, json, resource, time
from pldr_jax.training import host
applied = host.retain_freed_memory()
import jax, jax.numpy as jnp

@functools.partial(jax.jit, donate_argnums=0)
def step(s, w):
  t = jnp.tanh(s @ w)        # [8192, 4096]: 128 MiB
  u = jnp.cumsum(t, axis=0)  # and 128 MiB more
  return s + u[:, :s.shape[1]].sum() * 1e-9

s, w = jnp.ones((8192, 64)), jnp.ones((64, 4096)) * 1e-3
faults = []
for i in range(10):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  s = step(s, w); s.block_until_ready()
  time.sleep(0.05)  # PJRT frees the temporaries just after the output is ready
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"applied": applied,
                  "mib": sum(faults[-3:]) * resource.getpagesize() / 2 ** 20}))
"""


def _probe(env_extra: dict) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_extra}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_retained_memory_is_reused_without_page_faults():
  on = _probe({"PLDR_JAX_SYSTEM_MALLOC": "0"})
  off = _probe({"PLDR_JAX_SYSTEM_MALLOC": "1"})
  assert on["applied"] is True and off["applied"] is False
  # 3 calls x 256 MiB of temporaries: the system allocator faults them in again each time
  assert off["mib"] > 0.5 * 3 * 256, off
  assert on["mib"] < 0.05 * 3 * 256, on


def test_too_late_is_reported_not_applied():
  import jax
  import jax.numpy as jnp

  from pldr_jax.training import host
  jnp.ones(2).block_until_ready()  # the backend exists now
  assert jax.devices()
  if host.retained():  # an entry point run in this process applied it before JAX started
    assert host.retain_freed_memory() is True
  else:
    assert host.retain_freed_memory() is False
