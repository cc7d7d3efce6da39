"""The real steps compile for TPU topologies with the TPU compiler (libtpu, no chip).

`python -m pldr_jax.aot` builds the mesh pretrain.py builds on a topology's
devices and compiles train.make_train_step, the prefill and the decode steps
(full KV-cache, KV+G-cache, LESS) that `generate` runs. Here: the tiny config on
a 4-chip v5e (data 2 x fsdp 2, so weights really are split) and a 256-chip v5e
pod (data 256). Each program must compile, keep the shardings the library
declares for its parameters and caches (logical axes -> mesh), and hold no f64
array and no host callback. The tests run with x64 off, as production does.
"""

from __future__ import annotations

import json

import jax
import pytest

pytest.importorskip("libtpu", reason="the TPU compiler: pip install -e '.[tpu]'")
pytestmark = pytest.mark.slow  # whole-program compiles; `pytest -m 'not slow'` skips them

from pldr_jax import aot, backend  # noqa: E402
from pldr_jax.inference import kv_cache
from pldr_jax.training import train
from pldr_jax import params as params_lib  # noqa: E402
from pldr_jax.config import TrainConfig, tiny  # noqa: E402

DECODE = ("decode_kv", "decode_g", "decode_less")


def _same(actual, declared, shape) -> bool:
  return actual.is_equivalent_to(declared, len(shape))


def _check_tree(actual_tree, abstract_tree, what):
  """Every leaf's compiled input sharding equals the one declared on its abstract value."""
  pairs = zip(jax.tree.leaves(actual_tree), jax.tree.leaves(abstract_tree))
  bad = [(a, s.sharding) for a, s in pairs if not _same(a, s.sharding, s.shape)]
  assert not bad, f"{what}: compiled shardings differ from the declared ones: {bad[:3]}"


def _compile_all(topology: str, data: int, fsdp: int, batch: int, decode_batch: int,
                 attention: str = "plain"):
  config = tiny(compute_dtype="bfloat16", attention=attention)
  tc = TrainConfig(num_steps=10, warmup_steps=2, mesh_data=data, mesh_fsdp=fsdp)
  devices = aot.topology_devices(topology)
  mesh = train.make_mesh(tc, devices)
  out = {}
  with jax.enable_x64(False), backend.target("tpu"):
    progs = aot.build(config, tc, mesh, batch=batch, seq_len=config.max_len,
                      programs=("train", "prefill") + DECODE, decode_batch=decode_batch,
                      cost_twins=False)
    for p in progs:
      compiled, _, _ = aot.compile_program(p)
      out[p.name] = (p, compiled, aot.describe(p, compiled, aot.CHIPS["v5e"], len(devices)))
  return config, mesh, out


@pytest.mark.parametrize("topology, data, fsdp, batch, attention", [
    ("v5e:2x2", 2, 2, 8, "flash"),
    ("v5e:16x16", 256, 1, 256, "plain"),
])
def test_tiny_steps_compile_for_tpu(topology, data, fsdp, batch, attention):
  """Train, prefill and the three decode steps compile for a 4-chip data x fsdp mesh
  and a 256-chip one, with the declared shardings, no f64 and no host callback. The
  4-chip case takes attention='flash': the Pallas kernel (a Mosaic custom call, which
  XLA cannot partition) runs per batch shard inside the sharded train step and the
  prefill `generate` runs; decode always attends plainly."""
  config, mesh, out = _compile_all(topology, data, fsdp, batch, decode_batch=batch,
                                   attention=attention)
  assert set(out) == {"train", "prefill", *DECODE}
  for name in ("train", "prefill"):
    assert ("tpu_custom_call" in out[name][1].as_text()) == (attention == "flash"), name
  declared = params_lib.param_shardings(config, mesh)
  for name, (prog, compiled, row) in out.items():
    assert row["checks"] == {"f64": False, "host_callback": False}, name
    assert 0 < row["hbm"]["total"] < row["hbm"]["capacity"], name
    assert row["flops"] > 0 and row["bytes_accessed"] > 0, name
    assert row["estimate"]["step_s"] > 0, name
    json.dumps(row)  # the report is JSON as written
    args_shardings = compiled.input_shardings[0]
    if name in ("train", "prefill"):
      params_abs = prog.args[0]["params"] if name == "train" else prog.args[0]
      assert jax.tree.map(lambda s: s.sharding.spec, params_abs) == \
          jax.tree.map(lambda s: s.spec, declared)
      _check_tree(args_shardings[0], prog.args[0], f"{name} state / params")
    else:  # (step params, G-cache, decode state, tokens, cache spec)
      _check_tree(args_shardings[1], prog.args[1], f"{name} G-cache")
      _check_tree(args_shardings[2], prog.args[2], f"{name} decode state")
  # With fsdp the embed dimension of the weights is split, and the train step
  # gathers them: collectives beyond the gradient all-reduce.
  train_row = out["train"][2]
  if fsdp > 1:
    assert declared["embed"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert train_row["collectives"]["all-gather"]["count"] > 0
  else:
    assert train_row["collectives"]["all-reduce"]["count"] > 0
  # Decode caches are split over the batch axes as declared (logical 'batch').
  kv = out["decode_g"][0].args[2]
  assert kv.k[0].sharding.spec[0] == ("data", "fsdp")


def test_aot_command_line_reports_and_rejects(tmp_path, capsys):
  """The command prints the table and writes JSON; a topology that does not exist
  and a batch the mesh cannot split are one line each, exit 2."""
  out = tmp_path / "r.json"
  with jax.enable_x64(False):
    rc = aot.main(["--topology", "v5e:2x2", "--gin_file", "experiments/configs/tiny.gin",
                   "--gin_param", "PLDRConfig.vocab_size=64", "--gin_param",
                   "PLDRConfig.d_model=16", "--gin_param", "PLDRConfig.num_heads=2",
                   "--gin_param", "PLDRConfig.d_ff=24", "--gin_param", "PLDRConfig.a_dff=8",
                   "--gin_param", "PLDRConfig.max_len=32", "--gin_param",
                   "DataConfig.seq_len=32", "--gin_param", "DataConfig.batch_size=8",
                   "--gin_param", "DataConfig.vocab_size=64",
                   "--programs", "eval", "--json", str(out)])
  assert rc == 0
  text = capsys.readouterr().out
  assert "| eval |" in text and "ESTIMATE" in text
  record = json.loads(out.read_text())
  assert record["header"]["num_devices"] == 4 and len(record["programs"]) == 1
  for argv, needle in ((["--topology", "v9x:2x2"], "topology 'v9x:2x2'"),
                       (["--topology", "v5e:2x2", "--batch", "6"], "not divisible")):
    rc = aot.main(argv + ["--gin_file", "experiments/configs/tiny.gin", "--programs", "train"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_scanned_layers_are_counted_through_their_twins():
  """XLA counts a scanned layer loop's body once; `build` adds 1- and 2-layer
  unrolled twins whose extrapolation equals the counts of the same model with
  its 3 layers unrolled (the program with no loop)."""
  config = tiny(compute_dtype="bfloat16", num_layers=3)
  tc = TrainConfig(num_steps=10, warmup_steps=2, mesh_data=4, mesh_fsdp=1)
  mesh = train.make_mesh(tc, aot.topology_devices("v5e:2x2"))
  with jax.enable_x64(False), backend.target("tpu"):
    prog, = aot.build(config, tc, mesh, batch=8, seq_len=32, programs=("train",))
    assert prog.cost_twins is not None and prog.num_layers == 3
    c1, c2 = (aot._counts(aot.compile_program(t)[0]) for t in prog.cost_twins)
    est = aot.extrapolate(c1, c2, 3)
    flat, = aot.build(config.replace(scan_layers=False), tc, mesh, batch=8, seq_len=32,
                      programs=("train",))
    assert flat.cost_twins is None
    unrolled = aot._counts(aot.compile_program(flat)[0])
  assert est["flops"] == pytest.approx(unrolled["flops"], rel=0.02)
  assert est["bytes_accessed"] == pytest.approx(unrolled["bytes_accessed"], rel=0.15)
  # What the twins correct: the one-layer count is well below three layers'.
  assert c1["flops"] < 0.8 * unrolled["flops"]
