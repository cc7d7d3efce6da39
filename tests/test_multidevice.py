"""experiments/pretrain.py on 8 forced CPU devices and on two real processes (localhost).

8 devices (one process): data-parallel and data x FSDP runs save, are killed
(SIGKILL) or stopped (SIGTERM), resume, and reproduce the 1-device losses
(identity G, to 1e-5). Two processes (jax.distributed over localhost, gloo CPU
collectives): a run trains and checkpoints, and one of its processes is killed; the
other exits at once with one line (which process, the last intact checkpoint, the
command that resumes), and that command resumes both with the losses of an
uninterrupted two-process run; they sample the same tokens, and the checkpoint
restores to the same parameters on one process and on two.
"""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import compile_cache
from helpers import child_script
from test_pretrain import REPO, _cmd, _losses, _steps_saved, pretrain_module

pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it

STEPS = 60  # long enough that a run cannot finish between a poll and its signal
IDENTITY = ["PLDRConfig.g_mode='identity'", "TrainConfig.checkpoint_every=4"]


@pytest.fixture(scope="module")
def data_workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("shared_data")


def _env(devices: int = 1) -> dict:
  """`devices` forced CPU devices, and the compilation cache the end-to-end runs of this
  test process share (tests/compile_cache.py: a resumed run loads what its first run
  compiled)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return compile_cache.env(XLA_FLAGS=" ".join(flags))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _wait_for(cond, procs, what: str, timeout: float = 300):
  deadline = time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if cond():
      return
    time.sleep(0.05)
  assert all(p.poll() is None for p in procs), f"a process ended before {what}"
  assert cond(), f"timed out waiting for {what}"


def _finish(procs, timeout: float = 600) -> list[str]:
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, (out[-2000:], err[-4000:])
    outs.append(out)
  return outs


def _assert_no_duplicates(workdir, steps: int):
  import json
  recs = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs if "loss" in r] == list(range(1, steps + 1))


def test_8_devices_save_kill_resume_match_1_device(tmp_path, data_workdir):
  one = subprocess.run(_cmd(tmp_path / "one", data_workdir, STEPS, IDENTITY), env=_env(1),
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  want = _losses(tmp_path / "one")
  for name, mesh, sig in (("dp8", (8, 1), signal.SIGKILL), ("dp2_fsdp4", (2, 4), signal.SIGTERM)):
    wd = tmp_path / name
    cmd = _cmd(wd, data_workdir, STEPS, IDENTITY + [f"TrainConfig.mesh_data={mesh[0]}",
                                                    f"TrainConfig.mesh_fsdp={mesh[1]}"])
    proc = subprocess.Popen(cmd, env=_env(8), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(s >= 4 for s in _steps_saved(wd)), [proc], "the first checkpoint")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    if sig == signal.SIGTERM:
      assert proc.returncode == 0 and "stopped by SIGTERM" in out, err[-3000:]
    kept = max(_steps_saved(wd))
    assert kept < STEPS
    resumed = subprocess.run(cmd, env=_env(8), cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {kept}" in resumed.stdout
    _assert_no_duplicates(wd, STEPS)
    got = _losses(wd)
    np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                               rtol=1e-5, atol=0, err_msg=f"{name} (resumed at step {kept})")


def _two_processes(cmd_for, env=None) -> list[subprocess.Popen]:
  port = _free_port()
  return [subprocess.Popen(cmd_for(f"localhost:{port}", i), env=env or _env(1), cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def _pretrain2(workdir, data_workdir, steps, extra=(), verbose=True):
  """Both processes' commands; verbose: each writes to the console (by default only
  process 0 does)."""
  base = _cmd(workdir, data_workdir, steps, ["DataConfig.batch_size=4", *extra])
  base += ["--verbose"] if verbose else []
  return lambda address, i: base + ["--coordinator_address", address, "--num_processes", "2",
                                    "--process_id", str(i)]


# What may reach a survivor's stderr besides its one line: nothing from the C++ runtime
# (absl log lines, a check failure's stack trace), no traceback, no gloo error.
_SPEW = re.compile(r"^[IWEF]\d{4} |Check failure|Traceback|^\s+@\s+0x|[Gg]loo|"
                   r"coordination_service|terminate called", re.M)


def test_a_lost_process_ends_the_other_with_one_line_both_resume_sample_and_restore(
    tmp_path, data_workdir):
  """Two processes, one killed. SIGKILL process 0 (the coordinator) once a checkpoint is
  saved: process 1 exits 75 at once (a dead process closes its connections; the bound for
  a vanished host is --peer_timeout) with one line naming the lost process, the last
  intact checkpoint and the command that resumes, and writes nothing to stdout (no
  --verbose). That command, run for both processes, continues there with the losses of
  an uninterrupted two-process run (each process resumes its own data shard), samples
  the same tokens on both, and the checkpoint restores to the same parameters on one
  process and on two. tests/test_peers.py covers the other direction and the watch's
  messages without JAX."""
  steps = 12
  extra = ["TrainConfig.checkpoint_every=2"]
  full = _finish(_two_processes(_pretrain2(tmp_path / "full", data_workdir, steps, extra)))
  assert all(f"finished at step {steps}" in out for out in full)

  wd = tmp_path / "run"
  procs = _two_processes(_pretrain2(wd, data_workdir, steps, extra, verbose=False))
  _wait_for(lambda: _steps_saved(wd), procs, "the first checkpoint")
  procs[0].kill()
  t_kill = time.monotonic()
  out, err = procs[1].communicate(timeout=120)
  waited = time.monotonic() - t_kill
  procs[0].wait()
  kept = max(_steps_saved(wd))
  assert kept < steps
  assert procs[1].returncode == 75, err[-3000:]
  assert waited < 10, f"the survivor took {waited:.1f} s"  # ~0.1 s here; CI may be loaded
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and not _SPEW.search(err), err[-3000:]
  line = lines[0]
  assert line.startswith("error: process 0 of 2 is gone ("), line
  assert f"The last intact checkpoint is step {kept} in {wd / 'checkpoints'}." in line, line
  assert "start every process again, on every host" in line, line
  assert out == "", out[-2000:]  # only process 0 writes to the console

  # Resume: the printed command, with each process's own --process_id (and, to compare
  # the two processes' samples, both writing to the console).
  cmd = shlex.split(re.search(r"\(this one: (.+)\)\.$", line).group(1))
  assert cmd[cmd.index("--process_id") + 1] == "1"

  def resume(i):
    c = list(cmd)
    c[c.index("--process_id") + 1] = str(i)
    c += ["--verbose", "--gin_param=experiment.samples=1", "--gin_param=experiment.sample_tokens=6"]
    return subprocess.Popen(c, env=_env(1), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  outs = _finish([resume(0), resume(1)])
  for o in outs:
    assert f"resumed from {wd / 'checkpoints'} at step {kept}" in o, o[-2000:]
    assert f"finished at step {steps}" in o and "samples from" in o
  samples = [o[o.index("samples from"):] for o in outs]
  assert samples[0] == samples[1]  # the same parameters on both processes
  _assert_no_duplicates(wd, steps)
  assert _losses(wd) == _losses(tmp_path / "full")

  ckdir = str(wd / "checkpoints")
  restore = child_script("restore_digest")
  two = _finish(_two_processes(
      lambda address, i: [sys.executable, restore, ckdir, address, "2", str(i)]))
  one = _finish([subprocess.Popen([sys.executable, restore, ckdir, "", "1", "0"],
                                  env=_env(1), cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)])
  digests = {o.strip().splitlines()[-1] for o in two + one}
  assert digests == {f"STEP {steps} DIGEST {one[0].split()[-1]}"}, digests


def test_launch_resolution_flags_env_and_auto():
  from pldr_jax.training.distributed import Launch, launch_flags, launch_index, resolve
  assert resolve(environ={}) == Launch("single")
  assert resolve("h:1", 2, 1, environ={}) == Launch("explicit", "h:1", 2, 1)
  env = {"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert resolve(environ=env) == Launch("explicit", "h:2", 4, 3)
  assert resolve(None, None, 0, environ=env) == Launch("explicit", "h:2", 4, 0)  # flag wins
  assert resolve(None, 1, None, environ={}) == Launch("single")
  assert resolve(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) == Launch("single")
  slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
  assert resolve(environ=slurm) == Launch("auto") and launch_index(Launch("auto"), slurm) == 1
  assert launch_flags(Launch("explicit", "h:1", 2, 1)) == [
      "--coordinator_address=h:1", "--num_processes=2", "--process_id=1"]
  with pytest.raises(ValueError, match="num_processes"):
    resolve(environ={"JAX_COORDINATOR_ADDRESS": "h:1"})
  with pytest.raises(ValueError, match="process_id"):
    resolve("h:1", 2, 2, environ={})


def test_resume_command_drops_restore_step():
  cmd = pretrain_module().resume_command(["pretrain.py", "--gin_file=a b.gin", "--restore_step", "4",
                                 "--restore_step=8", "--workdir", "w"])
  assert cmd.endswith("pretrain.py '--gin_file=a b.gin' --workdir w")
