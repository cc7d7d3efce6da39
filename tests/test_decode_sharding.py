"""Decode shards like training: a batch of prompts on 8 forced CPU devices.

`generate` / `stream` with `mesh=` place the weights by their logical axes and
split the prompts and the caches (KVCache, GCache, a LESS SparseState) over the
batch axes with the same Flax logical-axis rules as training; the tokens must
equal those of one device, for the full cache and for a LESS cache.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import child_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.mark.slow  # end-to-end; CI runs it (`-m 'not slow'` skips it)
def test_generate_on_8_devices_gives_one_devices_tokens():
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=8"]))
  proc = subprocess.run([sys.executable, child_script("decode_sharding")], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  r = json.loads(line[len("RESULT "):])
  assert r["devices"] == 8
  for name in ("full", "less"):
    assert r[name]["eight"] == r[name]["one"], name
    assert r[name]["stream"] == r[name]["one"], name
  assert r["full"]["one"] != r["less"]["one"]  # the small LESS budget changes the tokens
  # The caches really are split over the batch axes, as the training batch.
  assert r["kv_spec"][0] == ["data", "fsdp"] and r["kv_devices"] == 8
  assert not any(r["kv_spec"][1:])
  assert r["g_spec"][:2] == [None, ["data", "fsdp"]]  # [L, B, ...]: B split
  assert r["param_spec"] == [None, "fsdp", None]      # [L, d, d]: d split, as in training
  assert r["kv_constraints"] >= 2 * 2  # k and v of both layers, after prefill and each step
