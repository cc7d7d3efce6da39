"""pldr_jax.training.host.retain_freed_memory: a steady-state XLA:CPU call faults no fresh pages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import child_script

ROOT = Path(__file__).resolve().parents[1]

def _probe(env_extra: dict) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **env_extra}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, child_script("host_probe")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
@pytest.mark.slow  # fresh interpreters
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
