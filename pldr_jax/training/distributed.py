"""Multi-process start-up and the few cross-process helpers the training code needs.

One code path for 1 device, N local devices and N processes: entry points call
`add_arguments(parser)` and then `initialize(args)` before any other JAX call.

  explicit   --coordinator_address HOST:PORT --num_processes N --process_id I
             (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)
  automatic  none of them, but a cluster JAX detects by itself (SLURM job with
             more than one task, TPU pod, Open MPI): `jax.distributed.initialize()`
  single     otherwise: nothing is initialised

On CPU the cross-process collectives go through gloo (set before initialising);
on a TPU pod or GPUs nothing is forced (`expected_platform`, `jax_settings`).
Everything here is a no-op (or the obvious single-process answer) when
`jax.process_count() == 1`.

A process that is lost (killed, crashed, its host gone) does not take the others
down with a C++ abort: `initialize` starts `pldr_jax.training.peers.Watch`, and every
survivor prints one line (which process, and what the entry point's
`peers.set_resume_hint` says: the last intact checkpoint and the command that
resumes) and exits with status 75 within about a second of a process's death, or
within --peer_timeout seconds (default 30) of a host's. Entry points call
`leaving()` before a normal exit and `failing(exc)` on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from pldr_jax import errors

__all__ = ["Launch", "add_arguments", "resolve", "launch_flags", "launch_index", "initialize",
           "peer_timeout", "leaving", "failing", "quiet_stdout",
           "expected_platform", "jax_settings",
           "barrier", "any_process", "gather_json", "run_once"]

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
ENV_PEER_TIMEOUT = "PLDR_PEER_TIMEOUT"
JAX_HEARTBEAT_TIMEOUT_S = 100  # jax.distributed's default: the C++ abort's own bound


class Launch(NamedTuple):
  """How this process starts: mode is 'single', 'explicit' or 'auto'."""
  mode: str
  address: str | None = None
  count: int | None = None
  index: int | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """--coordinator_address, --num_processes, --process_id (defaults: the JAX_* env vars)."""
  g = parser.add_argument_group("multi-process (jax.distributed)")
  g.add_argument("--coordinator_address", default=None,
                 help=f"HOST:PORT of process 0's coordinator (env {ENV_ADDRESS})")
  g.add_argument("--num_processes", type=int, default=None,
                 help=f"number of processes (env {ENV_COUNT})")
  g.add_argument("--process_id", type=int, default=None,
                 help=f"this process's index in [0, num_processes) (env {ENV_ID})")
  g.add_argument("--peer_timeout", type=float, default=None, metavar="SECONDS",
                 help="a lost process ends the others within about a second, one whose "
                      "host or network is gone within this many seconds (default "
                      f"{_default_peer_timeout():g}; env {ENV_PEER_TIMEOUT}; 0: jax's own "
                      "abort instead of one line)")


def _auto_detectable(environ: Mapping[str, str], dev: str | os.PathLike = "/dev") -> bool:
  """Whether `jax.distributed.initialize()` can find the cluster on its own (SLURM or
  Open MPI with more than one task; a TPU VM, whose slice JAX reads from the metadata
  server)."""
  slurm_tasks = environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS")
  if "SLURM_JOB_ID" in environ and slurm_tasks and slurm_tasks.isdigit():
    return int(slurm_tasks) > 1
  if "OMPI_COMM_WORLD_SIZE" in environ:
    return environ["OMPI_COMM_WORLD_SIZE"].isdigit() and int(environ["OMPI_COMM_WORLD_SIZE"]) > 1
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return True
  # A TPU VM: JAX finds the slice's hosts through the metadata server (one or many).
  return expected_platform(environ, dev) == "tpu"


def resolve(address: str | None = None, count: int | None = None, index: int | None = None,
            environ: Mapping[str, str] | None = None, dev: str | os.PathLike = "/dev") -> Launch:
  """How to start: flags first, then the JAX_* variables, then auto-detection.

  Raises ValueError for an incomplete or inconsistent explicit setting.
  """
  environ = os.environ if environ is None else environ
  address = address or environ.get(ENV_ADDRESS) or None

  def number(value, var):
    if value is not None:
      return int(value)
    raw = environ.get(var)
    if raw is None or raw == "":
      return None
    try:
      return int(raw)
    except ValueError:
      raise ValueError(f"{var}={raw!r} is not an integer") from None

  count, index = number(count, ENV_COUNT), number(index, ENV_ID)
  if address is None and count is None and index is None:
    return Launch("auto") if _auto_detectable(environ, dev) else Launch("single")
  missing = [name for name, v in (("--coordinator_address", address),
                                  ("--num_processes", count), ("--process_id", index))
             if v is None]
  if missing and not (count == 1 and address is None):
    raise ValueError(f"multi-process start needs {', '.join(missing)} (or {ENV_ADDRESS}, "
                     f"{ENV_COUNT}, {ENV_ID}); got coordinator_address={address!r}, "
                     f"num_processes={count!r}, process_id={index!r}")
  if count < 1 or (index is not None and not 0 <= index < count):
    raise ValueError(f"process_id={index} must be in [0, num_processes={count})")
  if count == 1:
    return Launch("single")
  return Launch("explicit", address, count, index)


def launch_flags(launch: Launch) -> list[str]:
  """The command-line flags that start a child process in the same group (explicit mode;
  auto-detected clusters pass their environment on by themselves)."""
  if launch.mode != "explicit":
    return []
  return [f"--coordinator_address={launch.address}", f"--num_processes={launch.count}",
          f"--process_id={launch.index}"]


def launch_index(launch: Launch, environ: Mapping[str, str] | None = None) -> int:
  """This process's index before `initialize` (auto mode: from the cluster's variables)."""
  environ = os.environ if environ is None else environ
  if launch.mode == "explicit":
    return launch.index
  if launch.mode == "auto":
    for var in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "TPU_WORKER_ID"):
      if environ.get(var, "").isdigit():
        return int(environ[var])
  return 0


def _default_peer_timeout() -> float:
  from pldr_jax.training import peers
  return peers.DEFAULT_TIMEOUT_S


def peer_timeout(args: argparse.Namespace | None = None,
                 environ: Mapping[str, str] | None = None) -> float:
  """--peer_timeout, else PLDR_PEER_TIMEOUT, else the default (seconds; 0: no watch)."""
  environ = os.environ if environ is None else environ
  value = getattr(args, "peer_timeout", None)
  if value is None:
    raw = environ.get(ENV_PEER_TIMEOUT, "").strip()
    try:
      value = float(raw) if raw else _default_peer_timeout()
    except ValueError:
      raise errors.ConfigError(f"{ENV_PEER_TIMEOUT}={raw!r} is not a number of seconds") from None
  if not value >= 0:
    raise errors.ConfigError(f"--peer_timeout must be >= 0 seconds, got {value:g}")
  return float(value)


def initialize(args: argparse.Namespace | None = None) -> Launch:
  """Start jax.distributed as `resolve` decides (idempotent); returns the decision.

  With several processes, also the lost-peer watch (`pldr_jax.training.peers`) unless
  --peer_timeout is 0: processes other than 0 reach the coordinator through its
  relay (explicit launches), and jax's heartbeat timeout is kept above the watch's.
  """
  import jax
  launch = resolve(getattr(args, "coordinator_address", None),
                   getattr(args, "num_processes", None), getattr(args, "process_id", None))
  if launch.mode == "single" or _already_initialized():
    return launch
  timeout = peer_timeout(args)
  for name, value in jax_settings(expected_platform()).items():
    if not getattr(jax.config, name):
      jax.config.update(name, value)
  from pldr_jax.training import peers
  kwargs = {}
  if timeout and 2 * timeout > JAX_HEARTBEAT_TIMEOUT_S and _accepts(
      jax.distributed.initialize, "heartbeat_timeout_seconds"):
    kwargs["heartbeat_timeout_seconds"] = int(2 * timeout) + 1
  relay = None
  if launch.mode == "explicit":
    address = launch.address
    if timeout and launch.index != 0:
      relay = peers.Relay(launch.address, on_lost=lambda: peers.current().coordinator_lost())
      address = relay.address
    jax.distributed.initialize(coordinator_address=address, num_processes=launch.count,
                               process_id=launch.index, **kwargs)
  else:
    jax.distributed.initialize(**kwargs)
  if timeout:
    _start_watch(launch, timeout, relay)
  return launch


def _accepts(fn, name: str) -> bool:
  import inspect
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _start_watch(launch: Launch, timeout: float, relay) -> None:
  """The lost-peer watch over jax.distributed's client (private API: without it, or if
  the liveness port cannot be reached, the run goes on with jax's own behaviour)."""
  from pldr_jax.training import peers
  try:
    from jax._src import distributed as jd
    state = jd.global_state
    client, index, count = state.client, state.process_id, state.num_processes
    coordinator = launch.address or state.coordinator_address
  except (ImportError, AttributeError):
    return
  if client is None or coordinator is None:
    return
  try:
    peers.Watch(index, count, coordinator, timeout_s=timeout, client=client,
                relay=relay).start()
  except Exception as e:  # noqa: BLE001 - the run can go on without the watch
    print(f"warning: process {index}: the lost-peer watch did not start ({type(e).__name__}: "
          f"{e}); a lost process will end this one with jax's own abort", file=sys.stderr,
          flush=True)


def leaving() -> None:
  """Call before a normal exit: the other processes do not report this one as lost."""
  from pldr_jax.training import peers
  if peers.current() is not None:
    peers.current().leaving()


def failing(exc: BaseException | None = None) -> None:
  """Call when this process stops on an error, before its one line: the others report
  'process I stopped on an error' (and stop) instead of a lost process. An error that
  a lost peer may have caused (a failed collective) first waits, up to the watch's
  bound, for the watch to name the lost process and end this one."""
  from pldr_jax.training import peers
  if peers.current() is not None:
    peers.current().failing(exc)


def quiet_stdout() -> None:
  """Send this process's stdout (Python's and the C++ libraries') to /dev/null: the
  processes other than 0 of a run, so only process 0 writes to the console. stderr,
  where errors go, stays."""
  try:
    sys.stdout.flush()
  except Exception:  # noqa: BLE001
    pass
  null = os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 1)
  os.close(null)


def expected_platform(environ: Mapping[str, str] | None = None,
                      dev: str | os.PathLike = "/dev") -> str:
  """'tpu', 'gpu' or 'cpu': where this process will run, read from the environment
  and the device files only (jax.distributed must start before any backend does).

  JAX_PLATFORMS (its first entry) decides when set; then a TPU VM (TPU_* worker
  variables, or /dev/accel* / /dev/vfio chips), then an NVIDIA GPU (/dev/nvidia0
  or CUDA_VISIBLE_DEVICES naming a device), else the CPU.
  """
  environ = os.environ if environ is None else environ
  dev = Path(dev)
  first = environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
  if first:
    return {"cuda": "gpu", "rocm": "gpu"}.get(first, first)
  # (Not TPU_SKIP_MDS_QUERY: `import jax` sets it to 1 where there is NO TPU chip.)
  if any(environ.get(v) for v in ("TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE",
                                  "TPU_WORKER_HOSTNAMES")):
    return "tpu"
  if any(dev.glob("accel*")) or any(p.name.isdigit() for p in dev.glob("vfio/*")):
    return "tpu"
  cuda = environ.get("CUDA_VISIBLE_DEVICES")
  if (dev / "nvidia0").exists() and cuda not in ("", "-1"):
    return "gpu"
  return "cpu"


def jax_settings(platform: str) -> dict[str, Any]:
  """jax.config settings to apply before `jax.distributed.initialize` on `platform`:
  on the CPU the cross-process collectives need gloo; TPUs (ICI/DCN) and GPUs
  (NCCL) bring their own, so nothing is forced there."""
  return {"jax_cpu_collectives_implementation": "gloo"} if platform == "cpu" else {}


def _already_initialized() -> bool:
  try:
    from jax._src import distributed
    return distributed.global_state.client is not None
  except (ImportError, AttributeError):  # private API moved: assume not
    return False


# ---------------------------------------------------------------- collectives

def barrier(name: str) -> None:
  """Wait until every process got here (no-op with one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (one small all-gather)."""
  import jax
  if jax.process_count() == 1:
    return bool(flag)
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))))


def gather_json(obj) -> list:
  """Every process's JSON-serialisable `obj`, in process order, on every process."""
  import jax
  if jax.process_count() == 1:
    return [obj]
  import numpy as np
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int64)))
  sizes = sizes.reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def _broadcast_token() -> str:
  """A random token drawn by process 0, the same on every process."""
  import numpy as np
  from jax.experimental import multihost_utils
  mine = np.frombuffer(secrets.token_bytes(8), np.uint32).copy()
  return "".join(f"{int(x):08x}" for x in multihost_utils.broadcast_one_to_all(mine))


def run_once(fn: Callable[[], Any], marker_dir: str | os.PathLike, name: str, *,
             timeout_s: float = 3600.0, poll_s: float = 0.2) -> Any:
  """`fn()` on process 0 only; every process gets its JSON-serialisable result.

  The others wait for a marker file `<marker_dir>/.<name>.<token>.json` (token:
  drawn for this run, so a marker left by an earlier, killed run is never
  read) that holds the result, or process 0's error, which they raise too.
  `marker_dir` must be on a file system every host sees. Safe to rerun: `fn`
  itself must reuse what an earlier run prepared.
  """
  import jax
  if jax.process_count() == 1:
    return fn()
  from etils import epath
  marker_dir = epath.Path(os.fspath(marker_dir))  # local or object storage (gs://...)
  marker = marker_dir / f".{name}.{_broadcast_token()}.json"
  if jax.process_index() == 0:
    try:
      record = {"result": fn()}
    except BaseException as e:
      _write_atomic(marker, {"error": f"{type(e).__name__}: {e}"})
      raise
    _write_atomic(marker, record)
  else:
    record = _wait_for(marker, timeout_s, poll_s)
    if "error" in record:
      raise RuntimeError(f"process 0 failed to prepare {name}: {record['error']}")
  barrier(f"pldr_jax.run_once.{name}")  # everyone has read it
  if jax.process_index() == 0:
    marker.unlink(missing_ok=True)
  return record["result"]


def _write_atomic(path: Path, record: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  if "://" in os.fspath(path):  # object storage: an object appears whole
    path.write_text(json.dumps(record))
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(record))
  os.replace(tmp, path)


def _wait_for(path: Path, timeout_s: float, poll_s: float) -> dict:
  deadline = time.monotonic() + timeout_s
  while not path.exists():
    if time.monotonic() > deadline:
      raise TimeoutError(f"waited {timeout_s:.0f}s for process 0 to write {path}; is this "
                         "directory on a file system every host sees?")
    time.sleep(poll_s)
  return json.loads(path.read_text())
