"""Checkpoints: bit-exact round trips, keep-N, G_LM alone, JSON items, errors, sharding."""

import dataclasses
import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import child_script
from pldr_jax import config as config_lib
from pldr_jax import model
from pldr_jax.errors import CheckpointCorrupt, CheckpointError, CheckpointMismatch
from pldr_jax.training.checkpoint import Checkpointer, abstract_like, load_g_lm, load_meta
from pldr_jax.g_modes import random_g
from pldr_jax.params import param_shardings, unstack_layers
from pldr_jax.params import init_params

DATA_STATE = {"parent": {"next_index": 3}, "offset": 1913}


@pytest.fixture(scope="module")
def state():
  """Tiny params (float32) and an adamw state after one update (count int32 = 1)."""
  cfg = config_lib.tiny()
  params = init_params(cfg, jax.random.key(0))
  adam, *rest = optax.adamw(1e-3).init(params)
  adam = adam._replace(count=jnp.ones((), jnp.int32),  # as after some updates
                       mu=jax.tree.map(lambda p: 0.1 * p, params),
                       nu=jax.tree.map(lambda p: p * p, params))
  opt_state = (adam, *rest)
  g = {"G_LM": random_g(cfg, jax.random.key(1), jnp.float32)}
  return cfg, params, opt_state, g


def _save(ckpt, step, state, g_lm=None, **meta):
  cfg, params, opt_state, _ = state
  return ckpt.save(step, params=params, opt_state=opt_state,
                   data_state={**DATA_STATE, "offset": step}, meta={"config": cfg, **meta},
                   g_lm=g_lm)


def _restore(ckpt, state, step=None):
  _, params, opt_state, _ = state
  return ckpt.restore(step, abstract_params=abstract_like(params),
                      abstract_opt_state=abstract_like(opt_state))


def _assert_bit_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _snapshot(directory):
  """Every file under directory with its size and modification time."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      st = os.stat(p)
      out[os.path.relpath(p, directory)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, state):
  """Finished checkpoints at steps 1 and 2 (synchronous saves), written once."""
  d = tmp_path_factory.mktemp("pristine") / "ckpt"
  with Checkpointer(d, keep=None, async_save=False) as ckpt:
    assert _save(ckpt, 1, state)
    assert _save(ckpt, 2, state)
  return d


@pytest.fixture
def two_steps(tmp_path, pristine):
  """A private copy of `pristine` to damage."""
  d = tmp_path / "ckpt"
  shutil.copytree(pristine, d)
  return d


# ---------------------------------------------------------------- round trips

def test_round_trip_bit_exact(tmp_path, state):
  cfg, params, opt_state, g = state
  d = tmp_path / "ckpt"
  with Checkpointer(d) as ckpt:
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    assert _save(ckpt, 5, state, g_lm=g, note="hello", lr=np.float32(0.5))
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [5] and ckpt.latest_step() == 5
    r = _restore(ckpt, state)
    assert set(r) == {"params", "opt_state", "data_state", "meta", "step"}
    assert r["step"] == 5
    _assert_bit_equal(r["params"], params)
    _assert_bit_equal(r["opt_state"], opt_state)
    assert type(r["opt_state"][0]) is type(opt_state[0])  # ScaleByAdamState namedtuple
    assert r["opt_state"][0].count.dtype == jnp.int32 and int(r["opt_state"][0].count) == 1
    # stacked layers: one tree of [L, ...] arrays
    assert isinstance(r["params"]["layers"], dict)
    assert r["params"]["layers"]["wq"]["kernel"].shape == (cfg.num_layers, 16, 16)
    assert r["data_state"] == {**DATA_STATE, "offset": 5}
    meta = r["meta"]
    assert meta["step"] == 5 and meta["note"] == "hello" and meta["lr"] == 0.5
    assert meta["config"] == dataclasses.asdict(cfg)
    assert config_lib.PLDRConfig(**meta["config"]) == cfg
    _assert_bit_equal(ckpt.restore_params(abstract_params=abstract_like(params)), params)
  assert load_meta(d) == meta
  assert set(os.listdir(d / "5")) >= {"params", "opt_state", "data_state", "meta", "g_lm",
                                      "checksums.json"}


def test_keep_n_async_and_skipped_steps(tmp_path, state):
  d = tmp_path / "ckpt"
  ckpt = Checkpointer(d, keep=2, async_save=True)
  for step in (10, 20, 30, 40):
    assert _save(ckpt, step, state)
  assert not _save(ckpt, 40, state)  # not after the latest: skipped
  assert not _save(ckpt, 35, state)
  with pytest.raises(CheckpointError, match="already exists"):
    ckpt.save(40, params=state[1], opt_state=state[2], data_state={}, meta={}, force=True)
  ckpt.close()
  ckpt.close()  # idempotent
  assert sorted(os.listdir(d)) == ["30", "40"]
  with pytest.raises(CheckpointError, match="closed"):
    _save(ckpt, 50, state)
  ckpt = Checkpointer(d, keep=2)
  assert ckpt.all_steps() == [30, 40]
  r = _restore(ckpt, state, step=30)
  assert r["step"] == 30 and r["data_state"]["offset"] == 30
  _assert_bit_equal(r["params"], state[1])
  ckpt.close()


def test_g_lm_alone(tmp_path, state):
  cfg, _, _, g = state
  d = tmp_path / "ckpt"
  per_layer = [np.asarray(g["G_LM"][i]) for i in range(cfg.num_layers)]
  with Checkpointer(d, async_save=False) as ckpt:
    _save(ckpt, 1, state, g_lm=g)
    _save(ckpt, 2, state, g_lm={"G_LM": per_layer, "mode": {"seed": np.array(7, np.int32)}})
    _save(ckpt, 3, state)  # learned-G run: no g_lm item
  loaded = load_g_lm(d, 1)
  assert isinstance(loaded["G_LM"], np.ndarray) and loaded["G_LM"].shape == (2, 2, 8, 8)
  _assert_bit_equal(loaded, jax.tree.map(np.asarray, g))
  loaded = load_g_lm(str(d), step=2)
  assert isinstance(loaded["G_LM"], list) and len(loaded["G_LM"]) == cfg.num_layers
  _assert_bit_equal(loaded["G_LM"], per_layer)
  assert int(loaded["mode"]["seed"]) == 7
  with pytest.raises(CheckpointMismatch, match="no g_lm item"):
    load_g_lm(d)  # latest step (3) has none
  with pytest.raises(CheckpointError, match=r"step 9 not found; available steps: \[1, 2, 3\]"):
    load_g_lm(d, 9)
  shutil.rmtree(d / "1" / "g_lm")  # saved, then lost: damage, not a run without G_LM
  with pytest.raises(CheckpointCorrupt, match="'g_lm' missing"):
    load_g_lm(d, 1)


@pytest.mark.x64
def test_other_dtypes_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5))
  tree = {"bf16": jnp.asarray(x, jnp.bfloat16), "f16": np.asarray(x, np.float16),
          "f64": jnp.asarray(x, jnp.float64), "i8": jnp.asarray(x * 50, jnp.int8),
          "u32": np.arange(7, dtype=np.uint32), "b": jnp.asarray(x > 0),
          "scalar": jnp.asarray(3.5, jnp.float32)}
  with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
    ckpt.save(0, params=tree, opt_state={"count": jnp.zeros((), jnp.int32)}, data_state={},
              meta={})
    got = ckpt.restore_params(abstract_params=abstract_like(tree))
    _assert_bit_equal(got, tree)
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(got))  # NumPy saved, too
    bad = abstract_like(tree)
    bad["bf16"] = jax.ShapeDtypeStruct((3, 5), jnp.float32)
    with pytest.raises(CheckpointMismatch,
                       match="dtype mismatch at bf16 saved bfloat16 vs requested float32"):
      ckpt.restore_params(abstract_params=bad)


def test_optimizer_state_without_arrays(tmp_path, state):
  # optax.sgd without momentum: (EmptyState(), EmptyState()); Orbax refuses empty items
  _, params, opt_state, _ = state
  sgd_state = optax.sgd(0.1).init(params)
  assert not jax.tree.leaves(sgd_state)
  with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
    assert ckpt.save(1, params=params, opt_state=sgd_state, data_state={}, meta={},
                     g_lm={"G_LM": []})
    r = ckpt.restore(abstract_params=abstract_like(params),
                     abstract_opt_state=abstract_like(sgd_state))
    assert r["opt_state"] == sgd_state
    _assert_bit_equal(r["params"], params)
    with pytest.raises(CheckpointMismatch, match="'opt_state' was saved without arrays"):
      ckpt.restore(abstract_params=abstract_like(params),
                   abstract_opt_state=abstract_like(opt_state))
  with pytest.raises(CheckpointMismatch, match="g_lm that holds no arrays"):
    load_g_lm(tmp_path / "ckpt")


def test_json_items_are_checked_at_save(tmp_path, state):
  _, params, opt_state, _ = state
  d = tmp_path / "ckpt"
  with Checkpointer(d) as ckpt:
    with pytest.raises(CheckpointError, match="keys must be strings"):
      ckpt.save(1, params=params, opt_state=opt_state, data_state={1: 2}, meta={})
    with pytest.raises(CheckpointError, match="meta/arr = ndarray is not JSON"):
      ckpt.save(1, params=params, opt_state=opt_state, data_state={}, meta={"arr": np.ones(3)})
    with pytest.raises(CheckpointError, match="differs from step"):
      ckpt.save(1, params=params, opt_state=opt_state, data_state={}, meta={"step": 2})
    with pytest.raises(CheckpointError, match="data_state must be a dict"):
      ckpt.save(1, params=params, opt_state=opt_state, data_state=[1], meta={})
    assert ckpt.all_steps() == []
    assert ckpt.save(1, params=params, opt_state=opt_state,
                     data_state={"t": (1, 2), "p": pathlib.Path("/x")}, meta={})
    r = _restore(ckpt, state)
  assert r["data_state"] == {"t": [1, 2], "p": "/x"} and r["meta"] == {"step": 1}


# ---------------------------------------------------------------- errors

def test_missing_directory_and_steps(tmp_path, state):
  d = tmp_path / "nope"
  ckpt = Checkpointer(d)
  assert ckpt.latest_step() is None and not d.exists()  # opening creates nothing
  with pytest.raises(CheckpointError, match="does not exist") as e:
    _restore(ckpt, state)
  assert e.value.path == str(d) and str(d) in str(e.value)
  with pytest.raises(CheckpointError, match="does not exist"):
    load_g_lm(d)
  with pytest.raises(CheckpointError, match="does not exist"):
    load_meta(d)
  ckpt.close()
  d.mkdir()
  with Checkpointer(d) as ckpt:
    with pytest.raises(CheckpointError, match="no finished checkpoints"):
      ckpt.restore_params(abstract_params=abstract_like(state[1]))


def test_unknown_step_lists_available(two_steps, state):
  with Checkpointer(two_steps) as ckpt:
    with pytest.raises(CheckpointError, match=r"step 7 not found; available steps: \[1, 2\]"):
      _restore(ckpt, state, step=7)


def test_abstract_tree_mismatch_names_key_paths(two_steps, state):
  _, params, opt_state, _ = state
  ckpt = Checkpointer(two_steps)
  ab_o = abstract_like(opt_state)

  bad = abstract_like(params)
  bad["layers"]["wq"]["kernel"] = jax.ShapeDtypeStruct((2, 8, 16), jnp.float32)
  with pytest.raises(CheckpointMismatch, match=r"shape mismatch at layers/wq/kernel saved "
                                               r"\(2, 16, 16\) vs requested \(2, 8, 16\)"):
    ckpt.restore(abstract_params=bad, abstract_opt_state=ab_o)

  bad = abstract_like(params)
  del bad["head"]
  with pytest.raises(CheckpointMismatch, match="not in the abstract tree: head/bias, head/ker"):
    ckpt.restore(abstract_params=bad, abstract_opt_state=ab_o)

  bad = abstract_like(params)
  bad["layers"]["wx"] = bad["layers"]["wq"]
  with pytest.raises(CheckpointMismatch, match="not in the checkpoint: layers/wx/bias, "
                                               "layers/wx/kernel"):
    ckpt.restore_params(abstract_params=bad)

  bad = abstract_like(params)  # one layer more: the stacked [L] axis does not match
  bad["layers"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct((3, *x.shape[1:]), x.dtype),
                               bad["layers"])
  with pytest.raises(CheckpointMismatch, match=r"shape mismatch at layers/ffn/w1/bias saved "
                                               r"\(2, 24\) vs requested \(3, 24\)"):
    ckpt.restore_params(abstract_params=bad)

  bad = abstract_like(params)
  bad["embed"] = jax.ShapeDtypeStruct(bad["embed"].shape, jnp.bfloat16)
  with pytest.raises(CheckpointMismatch, match="dtype mismatch at embed saved float32 vs req"):
    ckpt.restore_params(abstract_params=bad)

  sgd_state = optax.sgd(0.1, momentum=0.9).init(params)
  with pytest.raises(CheckpointMismatch, match="abstract 'opt_state' tree does not match"):
    ckpt.restore(abstract_params=abstract_like(params),
                 abstract_opt_state=abstract_like(sgd_state))
  # nothing was harmed: the real trees still restore
  _assert_bit_equal(_restore(ckpt, state)["params"], params)
  ckpt.close()


def _data_files(step_dir, item="params"):
  # OCDBT keeps data both per process (ocdbt.process_*/d) and, once the save is
  # finalised, in the item's merged d/ that its top-level manifest may point to.
  files = (glob.glob(os.path.join(step_dir, item, "ocdbt.process_*", "d", "*")) +
           glob.glob(os.path.join(step_dir, item, "d", "*")))
  assert files
  return files


def _truncate_data(step_dir):
  for f in _data_files(step_dir):
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _delete_data(step_dir):
  for f in _data_files(step_dir):
    os.remove(f)


def _flip_bytes(step_dir):
  # zstd chunks carry no checksum: some flips decode to wrong values silently,
  # which only the checksums written at save time catch.
  for f in _data_files(step_dir):
    b = bytearray(pathlib.Path(f).read_bytes())
    for i in range(len(b) // 2, min(len(b), len(b) // 2 + 8)):
      b[i] ^= 0xFF
    pathlib.Path(f).write_bytes(bytes(b))


def _garbage_array_metadata(step_dir):
  pathlib.Path(step_dir, "params", "_METADATA").write_text("garbage{")


def _garbage_json_item(step_dir):
  pathlib.Path(step_dir, "data_state", "metadata").write_text("{not json")


def _delete_item(step_dir):
  shutil.rmtree(os.path.join(step_dir, "opt_state"))


def _wrong_checksum(step_dir):
  p = pathlib.Path(step_dir, "checksums.json")
  record = json.loads(p.read_text())
  entry = record["items"]["params"]["_METADATA"]
  entry[1] ^= 1
  p.write_text(json.dumps(record))


def _garbage_checksums(step_dir):
  pathlib.Path(step_dir, "checksums.json").write_text('{"format": 1}')


# When a restore fails part-way, Orbax abandons its other read coroutines and closes
# their event loop; Python then reports them as unraisable. Harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage, names", [
    (_truncate_data, None),
    (_delete_data, None),
    (_flip_bytes, None),
    (_garbage_array_metadata, None),
    (_garbage_json_item, None),
    (_delete_item, "'opt_state'"),
    (_wrong_checksum, "_METADATA"),
    (_garbage_checksums, "checksum file"),
])
def test_corrupt_checkpoint_fails_cleanly_and_older_survives(two_steps, state, damage, names):
  damage(str(two_steps / "2"))
  before = _snapshot(two_steps)
  with Checkpointer(two_steps, keep=1) as ckpt:  # keep=1 must not delete anything on restore
    with pytest.raises(CheckpointCorrupt, match=names) as e:
      _restore(ckpt, state)  # latest = 2, the damaged one
    assert str(two_steps / "2") in e.value.path
    assert ckpt.all_steps() == [1, 2]
    r = _restore(ckpt, state, step=1)
  assert r["step"] == 1
  _assert_bit_equal(r["params"], state[1])
  _assert_bit_equal(r["opt_state"], state[2])
  assert _snapshot(two_steps) == before  # nothing written, renamed or deleted


def test_resume_skips_a_damaged_step_but_not_a_mismatch(two_steps, state):
  from pldr_jax.training import trainer
  _, params, opt_state, _ = state
  _flip_bytes(str(two_steps / "2"))
  abstract = {"params": abstract_like(params), "opt_state": abstract_like(opt_state)}
  warned = []
  with Checkpointer(two_steps) as ckpt:
    r, failed = trainer.restore_newest_good(ckpt, abstract, warn=warned.append)
    assert r["step"] == 1 and failed == [2] and "falling back to step 1" in warned[0]
    abstract["params"] = {**abstract["params"], "embed": jax.ShapeDtypeStruct((1,), jnp.float32)}
    with pytest.raises(CheckpointMismatch, match="embed saved"):  # another model: no fall-back
      trainer.restore_newest_good(ckpt, abstract)


def test_checkpoint_without_checksums_still_restores(two_steps, state):
  os.remove(two_steps / "2" / "checksums.json")
  _, params, opt_state, _ = state
  with Checkpointer(two_steps) as ckpt:
    _assert_bit_equal(_restore(ckpt, state)["opt_state"], opt_state)
    bad = abstract_like(params)
    bad["layers"]["ffn"]["w3"]["bias"] = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    with pytest.raises(CheckpointMismatch, match=r"shape mismatch at layers/ffn/w3/bias saved "
                                                 r"\(2, 16\) vs requested \(2, 3\)"):
      ckpt.restore_params(abstract_params=bad)


def test_unfinished_save_is_ignored(two_steps, state):
  # A save cut short by a crash: Orbax writes <step>.orbax-checkpoint-tmp, renames at the end.
  partial = two_steps / "3.orbax-checkpoint-tmp"
  shutil.copytree(two_steps / "2", partial)
  for f in _data_files(str(partial)):
    os.remove(f)
  (two_steps / "4.orbax-checkpoint-tmp").mkdir()
  with Checkpointer(two_steps) as ckpt:
    assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
    assert _restore(ckpt, state)["step"] == 2
    with pytest.raises(CheckpointError, match=r"step 3 not found; available steps: \[1, 2\]; "
                                              r"unfinished saves \(ignored\): 3\.orbax"):
      _restore(ckpt, state, step=3)
    assert partial.exists()  # a reader never deletes (it may be another process's save)
    # resuming from step 2 and saving step 3 again replaces the leftover
    assert _save(ckpt, 3, state, g_lm=state[3])
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1, 2, 3] and not partial.exists()
    _assert_bit_equal(_restore(ckpt, state)["params"], state[1])
  _assert_bit_equal(load_g_lm(two_steps), jax.tree.map(np.asarray, state[3]))


# ---------------------------------------------------------------- sharding

def test_abstract_like(state):
  _, params, _, _ = state
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tree = {"a": params["embed"], "b": np.zeros((2, 3), np.int16), "c": 3, "d": None,
          "e": jax.ShapeDtypeStruct((4,), jnp.float32)}
  ab = abstract_like(tree)
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  assert ab["a"].sharding == params["embed"].sharding and ab["b"].sharding == one_device
  assert ab["e"].sharding == one_device
  assert ab["b"].dtype == np.int16 and ab["c"] == 3 and ab["d"] is None
  ab = abstract_like(tree, rep)
  assert all(ab[k].sharding == rep for k in "abe")
  ab = abstract_like(tree, {"a": rep, "b": None, "c": None, "d": None, "e": rep})
  assert ab["a"].sharding == rep and ab["b"].sharding == one_device and ab["e"].sharding == rep
  with pytest.raises(ValueError, match="shardings do not match"):
    abstract_like(tree, {"a": rep})


def test_restore_with_sharding_one_device(two_steps, state):
  cfg, params, opt_state, _ = state
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
  shardings = param_shardings(cfg, mesh)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with Checkpointer(two_steps) as ckpt:
    r = ckpt.restore(abstract_params=abstract_like(params, shardings),
                     abstract_opt_state=abstract_like(opt_state, rep))
  for got, want in zip(jax.tree.leaves(r["params"]), jax.tree.leaves(shardings)):
    assert got.sharding == want
  assert all(x.sharding == rep for x in jax.tree.leaves(r["opt_state"]))
  _assert_bit_equal(r["params"], params)
  _assert_bit_equal(r["opt_state"], opt_state)


def test_per_layer_checkpoint_is_a_mismatch(tmp_path, state):
  """Params with a list of per-layer trees (the layout of checkpoints written before
  2026-11-27) do not restore into the stacked tree: a mismatch naming the key paths."""
  cfg, params, opt_state, _ = state
  old_params = unstack_layers(params)
  with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
    assert ckpt.save(4, params=old_params, opt_state=optax.adamw(1e-3).init(old_params),
                     data_state=DATA_STATE, meta={"config": cfg})
    with pytest.raises(CheckpointMismatch, match="not in the checkpoint: layers/ffn/w1/bias.*"
                                                 "not in the abstract tree: layers/0/ffn"):
      ckpt.restore_params(abstract_params=abstract_like(params))
    _assert_bit_equal(ckpt.restore_params(abstract_params=abstract_like(old_params)), old_params)


@pytest.mark.slow  # a fresh interpreter on 4 devices
def test_sharded_restore_four_devices(tmp_path, state):
  params_file = tmp_path / "params.npz"
  np.savez(params_file, **{str(i): np.asarray(x)
                           for i, x in enumerate(jax.tree.leaves(state[1]))})
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, child_script("sharded_checkpoint"), str(tmp_path / "ckpt"),
                         str(params_file)], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]
