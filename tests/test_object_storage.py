"""A run folder on object storage, end to end, against a GCS emulator started here.

gcp-storage-emulator (in memory, on a free localhost port) stands in for
Google Cloud Storage: gcsfs / etils.epath reach it through STORAGE_EMULATOR_HOST,
TensorStore (Orbax's arrays) through TENSORSTORE_GCS_HTTP_URL. One pretraining
run lives in `gs://bucket/run`, with its data and tokenizer in `gs://bucket/data`:
SIGTERM, a corrupt newest checkpoint and the fall-back with the losses of the
uninterrupted run, a 2-process resume, then `pldr_jax.load` + `generate`. The
processes run in an empty working directory with HOME elsewhere: nothing of the
run may land on local disk outside the cache (PLDR_JAX_CACHE).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it

from test_pretrain import REPO, SCRIPT, SMALL  # noqa: E402

RUN, DATA = "gs://bucket/run", "gs://bucket/data"
# gcsfs first asks over gRPC whether a bucket is hierarchical or zonal, and waits 2 x 60 s
# for an emulator that cannot answer: the plain (non-experimental) client skips that probe.
NO_PROBE = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _patch_emulator():
  """The emulator's downloads lack the x-goog-generation header TensorStore reads
  (OCDBT's manifests are written conditionally on it): add it."""
  from gcp_storage_emulator.handlers import objects
  if getattr(objects.download, "_with_generation", False):
    return
  plain = objects.download

  def download(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except Exception:  # noqa: BLE001 - a missing object: the plain handler answers 404
      pass
    return plain(request, response, storage, *args, **kwargs)

  download._with_generation = True
  objects.download = download


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """(environment for the processes of a run, gcsfs filesystem) of one emulator."""
  _patch_emulator()  # before the server module binds its routes
  import logging
  logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
  from gcp_storage_emulator.server import create_server
  port = _free_port()
  server = create_server("localhost", port, in_memory=True, default_bucket="bucket")
  server.start()
  url = f"http://localhost:{port}"
  root = tmp_path_factory.mktemp("gcs")
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, **NO_PROBE,
         "PLDR_JAX_CACHE": str(root / "cache"), "HOME": str(root / "home"),
         "JAX_PLATFORMS": "cpu"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import gcsfs
  fs = gcsfs.GCSFileSystem(use_listings_cache=False)
  (root / "cwd").mkdir()
  (root / "home").mkdir()
  yield env, fs, root
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.stop()


def _cmd(steps, extra=()):
  params = SMALL + [f"TrainConfig.num_steps={steps}", "TrainConfig.checkpoint_every=2",
                   f"experiment.data_workdir='{DATA}'", *extra]
  return [sys.executable, str(SCRIPT), "--gin_file", str(REPO / "experiments/configs/tiny.gin"),
          "--workdir", RUN, "--no_progress"] + [f"--gin_param={p}" for p in params]


def _steps(fs) -> list[int]:
  """Finished steps: Orbax marks a step finished on GCS with commit_success.txt."""
  found = fs.glob("bucket/run/checkpoints/*/commit_success.txt")
  return sorted(int(p.split("/")[-2]) for p in found if p.split("/")[-2].isdigit())


def _losses(fs) -> dict[int, float]:
  out = {}
  for line in fs.cat("bucket/run/metrics.jsonl").decode().splitlines():
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec["loss"]
  return out


def _start(env, root, cmd):
  """The run as two processes (one coordinator on localhost), started."""
  port = _free_port()
  return [subprocess.Popen(
      cmd + [f"--coordinator_address=localhost:{port}", "--num_processes=2",
             f"--process_id={i}"], env=dict(os.environ, **env), cwd=root / "cwd",
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs) -> list[str]:
  """Every process's stdout once all exited 0."""
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outs]


def test_a_2_process_run_on_gcs_stops_falls_back_resumes_and_loads(gcs):
  """Every step of the run is two processes (each writes its own part of every
  checkpoint; process 0 the metrics, TensorBoard and data); the single-process run
  takes the same code path with one writer."""
  env, fs, root = gcs
  # 1. SIGTERM (to process 0; process 1 learns it at the end of the step) once the
  # step-2 checkpoint is finished: both save the current step and exit 0.
  procs = _start(env, root, _cmd(40))
  deadline = time.time() + 240
  while time.time() < deadline and procs[0].poll() is None and not _steps(fs):
    time.sleep(0.1)
  assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
  time.sleep(0.5)  # into a later step
  procs[0].send_signal(signal.SIGTERM)
  out = _finish(procs)[0]
  saved = _steps(fs)
  stopped = saved[-1]
  assert f"stopped by SIGTERM at step {stopped}" in out and stopped > 2, out[-2000:]
  first = _losses(fs)  # the uninterrupted run up to the signal
  assert sorted(first) == list(range(1, stopped + 1))
  assert fs.find("bucket/run/tensorboard") and fs.find("bucket/data/tfds")

  # 2. The newest checkpoint corrupt: the run falls back to the one before and
  # recomputes the steps after it with the losses of the uninterrupted run.
  blob = next(f for f in fs.find(f"bucket/run/checkpoints/{stopped}/params") if "/d/" in f)
  b = bytearray(fs.cat(blob))
  b[len(b) // 2] ^= 0xFF
  fs.pipe(blob, bytes(b))
  out = _finish(_start(env, root, _cmd(stopped + 2)))[0]
  back = saved[-2]
  assert f"checkpoint step {stopped}" in out and f"falling back to step {back}" in out, out[-2000:]
  assert fs.isdir(f"bucket/run/checkpoints/{stopped}.corrupt")
  assert f"finished at step {stopped + 2}" in out and _steps(fs)[-1] == stopped + 2
  resumed = _losses(fs)
  assert sorted(resumed) == list(range(1, stopped + 3))
  for s in range(back + 1, stopped + 1):
    assert resumed[s] == first[s], (s, resumed[s], first[s])

  # 3. Nothing of the run on local disk but the cache.
  assert not any((root / "cwd").iterdir())
  local = [p for p in (root / "home").rglob("*") if p.is_file()]
  assert not local, local[:5]

  # 4. Opened from the bucket: configs, weights, tokenizer; it generates.
  import jax
  import pldr_jax
  from pldr_jax.inference import generate
  m = pldr_jax.load(RUN)
  assert m.step == stopped + 2 and m.tokenizer is not None
  assert m.data.tokenizer_path.startswith(DATA) and m.data.data_dir.startswith(DATA)
  prompt = [2] + m.tokenizer.encode("It is a truth")
  out = generate.generate(m.params, [prompt], config=m.config, max_new_tokens=4,
                          key=jax.random.key(0), g_lm=m.g_lm)
  assert len(out[0]) == 4 and isinstance(m.tokenizer.decode(out[0]), str)
