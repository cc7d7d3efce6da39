"""Start-up settings per platform: gloo only on the CPU, TPU VMs auto-detected."""

import os
import subprocess
import sys

import pytest

from helpers import child_script
from pldr_jax.training import distributed


def _dev(tmp_path, *files):
  for f in files:
    p = tmp_path / f
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("")
  return tmp_path


@pytest.mark.parametrize("environ, files, platform", [
    ({}, (), "cpu"),
    ({"JAX_PLATFORMS": "cpu"}, ("accel0",), "cpu"),          # the user's choice wins
    ({"JAX_PLATFORMS": "tpu,cpu"}, (), "tpu"),
    ({"JAX_PLATFORMS": "cuda"}, (), "gpu"),
    ({}, ("accel0",), "tpu"),                                  # v4 / v5e / v5p TPU VM
    ({}, ("vfio/0",), "tpu"),                                  # v6e TPU VM
    ({"TPU_WORKER_ID": "3"}, (), "tpu"),
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-256"}, (), "tpu"),
    ({"TPU_SKIP_MDS_QUERY": "1"}, (), "cpu"),                 # what `import jax` sets on a CPU
    ({}, ("nvidia0",), "gpu"),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, ("nvidia0",), "cpu"),
])
def test_expected_platform(tmp_path, environ, files, platform):
  assert distributed.expected_platform(environ, _dev(tmp_path, *files)) == platform


def test_gloo_only_on_cpu():
  assert distributed.jax_settings("cpu") == {"jax_cpu_collectives_implementation": "gloo"}
  assert distributed.jax_settings("tpu") == {}
  assert distributed.jax_settings("gpu") == {}


def test_tpu_vm_starts_jax_distributed_by_itself(tmp_path):
  """On a TPU VM (one host or a pod slice) JAX reads the hosts from the metadata
  server, so `resolve` picks 'auto'; a plain machine stays single."""
  assert distributed.resolve(environ={}, dev=_dev(tmp_path / "tpu", "accel0")).mode == "auto"
  assert distributed.resolve(environ={}, dev=_dev(tmp_path / "cpu")).mode == "single"
  assert distributed.resolve(environ={"JAX_PLATFORMS": "cpu"},
                             dev=_dev(tmp_path / "tpu2", "accel0")).mode == "single"
  explicit = distributed.resolve("h:1", 2, 1, environ={}, dev=_dev(tmp_path / "tpu3", "accel0"))
  assert explicit == distributed.Launch("explicit", "h:1", 2, 1)


@pytest.mark.slow  # a fresh interpreter
def test_a_plain_machine_after_import_jax_is_single(tmp_path):
  """What a user's `python experiments/pretrain.py` meets: no JAX_PLATFORMS, jax (and,
  with the tpu extra, libtpu) imported before the launch is resolved. On a machine with
  no TPU chip `import jax` sets TPU_SKIP_MDS_QUERY=1; the launch must stay single (it
  once read that as a TPU VM and started jax.distributed, which failed)."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS",)}
  env = {k: v for k, v in env.items() if not k.startswith("TPU_")}
  out = subprocess.run([sys.executable, child_script("platform_probe")], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == "single", out.stdout
