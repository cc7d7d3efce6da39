"""pldr_jax_lm_eval: the `pldr-jax` lm-eval model on a tiny checkpoint."""

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.instance import Instance

from pldr_jax.training import checkpoint as ckpt_lib
from pldr_jax import config as config_lib
from pldr_jax import model as pmodel
from pldr_jax import params as params_lib
from pldr_jax.data.tokenizer import END_ID

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pldr_jax_lm_eval import model as lem  # noqa: E402  (registers "pldr-jax")

pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
MAX_LEN = 64


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run workdir as the trainer writes it (random-init params, real tokenizer)."""
  from pldr_jax.data import prepare_default_data
  root = tmp_path_factory.mktemp("lm_eval")
  data = prepare_default_data(root / "data", vocab_size=512, seq_len=32, batch_size=2,
                              eval_batch_size=2, max_tokenizer_documents=40, num_threads=0)
  config = config_lib.tiny(vocab_size=512, max_len=MAX_LEN, num_layers=2)
  params = params_lib.init_params(config, jax.random.key(0))
  wd = root / "model"
  with ckpt_lib.Checkpointer(wd / "checkpoints", async_save=False) as ck:
    ck.save(1, params=params, opt_state={}, data_state={},
            meta={"model": dataclasses.asdict(config), "data": dataclasses.asdict(data)})
  return wd, config, params


@pytest.fixture(scope="module")
def lm(workdir):
  return lem.PLDRJaxLM(checkpoint=str(workdir[0]), batch_size=4)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  """tests/lm_eval_tasks with data_files made absolute."""
  d = tmp_path_factory.mktemp("tasks")
  for f in TASKS.iterdir():
    if f.suffix == ".yaml":
      text = f.read_text().replace("validation: pldr_tiny_mc.jsonl",
                                   f"validation: {TASKS / 'pldr_tiny_mc.jsonl'}")
      (d / f.name).write_text(text)
  return d


def _req(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def _forward_logprobs(params, config, ids, g_lm=None, whole=False):
  """log p(ids[t] | ids[:t]) for t >= 1 from one plain forward, float64.

  whole: the forward runs over all of ids (the learned G_LM sees the last token
  too, as in training); else over ids[:-1] (the last token is never an input).
  """
  inp = ids if whole else ids[:-1]
  logits, _ = pmodel.forward(params, jnp.asarray([inp], jnp.int32), config=config, g_lm=g_lm)
  lp = np.asarray(jax.nn.log_softmax(logits[0, :len(ids) - 1].astype(jnp.float32), -1),
                  np.float64)
  return lp[np.arange(len(ids) - 1), ids[1:]]


def _load_evaluate():
  import importlib.util
  path = Path(__file__).resolve().parents[1] / "experiments" / "evaluate.py"
  spec = importlib.util.spec_from_file_location("pldr_evaluate", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_registered():
  from lm_eval.api.registry import get_model
  assert get_model("pldr-jax") is lem.PLDRJaxLM


def test_evaluate_script_g_cache_on_off_identical(workdir, task_dir, tmp_path):
  """experiments/evaluate.py end to end (lm_eval.simple_evaluate): the local task
  runs with g_cache on and off with identical scores; an unknown task is reported."""
  ev = _load_evaluate()
  out = tmp_path / "results.json"
  rc = ev.main(["--checkpoint", str(workdir[0]), "--tasks", "pldr_tiny_mc,no_such_task",
                "--include_path", str(task_dir), "--no_default_tasks", "--g_cache", "both",
                "--batch_size", "4", "--out", str(out)])
  assert rc == 1
  import json
  report = json.loads(out.read_text())
  assert list(report["failed"]) == ["no_such_task"]
  on, off = report["g_cache"]["on"]["pldr_tiny_mc"], report["g_cache"]["off"]["pldr_tiny_mc"]
  assert 0.0 <= on["acc,none"] <= 1.0
  assert on["acc,none"] == off["acc,none"] and on["acc_norm,none"] == off["acc_norm,none"]


def test_simple_evaluate_by_name_matches_direct_scores(workdir, task_dir, lm):
  """`--model pldr-jax` by name; per-choice log-likelihoods equal the direct API's."""
  from lm_eval.tasks import TaskManager
  tm = TaskManager(include_path=str(task_dir), include_defaults=False)
  out = lm_eval.simple_evaluate(
      model="pldr-jax", model_args={"checkpoint": str(workdir[0]), "batch_size": 4,
                                    "g_cache": False},
      tasks=["pldr_tiny_mc"], task_manager=tm, log_samples=True, bootstrap_iters=0, limit=4)
  samples = sorted(out["samples"]["pldr_tiny_mc"], key=lambda s: s["doc_id"])
  assert len(samples) == 4
  for s in samples:
    assert len(s["arguments"]) == 3  # one (context, continuation) per choice
    reqs = [_req("loglikelihood", *a) for a in s["arguments"]]
    got = np.array([r[0] for r in s["filtered_resps"]], np.float64)
    assert np.all(np.isfinite(got)) and np.all(got < 0)
    want = np.array([r[0] for r in lm.loglikelihood(reqs)], np.float64)
    # Same model, other batch composition (so other padded shapes and fp32 sums):
    # equal to fp32 rounding of a ~25-nat sum.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_loglikelihood_is_forward_with_context_g(lm, workdir):
  _, config, params = workdir
  pairs = [("Question: What do bees make?\nAnswer:", " honey"),
           ("The sun", " rises in the east and sets in the west."),
           ("", "hello world"),
           ("A much longer context. " * 20, " that gets truncated on the left")]
  got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
  lm_off = lem.PLDRJaxLM(checkpoint=str(workdir[0]), batch_size=4, g_cache=False)
  got_off = lm_off.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
  for (c, x), (ll, greedy), (ll_off, _) in zip(pairs, got, got_off):
    ctx, cont = lm._fit(*lm._encode_pair(c, x))
    assert len(ctx) + len(cont) - 1 <= MAX_LEN
    # G_LM of the context alone, held fixed over the whole sequence.
    _, ded = pmodel.forward(params, jnp.asarray([ctx], jnp.int32), config=config,
                            return_deductive=True)
    g = jnp.stack([d["G_LM"] for d in ded])  # [L, 1, H, dk, dk]
    lp = _forward_logprobs(params, config, ctx + cont, g_lm=g)[len(ctx) - 1:]
    assert len(lp) == len(cont)
    assert ll == pytest.approx(float(lp.sum()), abs=1e-4, rel=1e-5)
    assert ll_off == pytest.approx(ll, abs=1e-5)
    assert isinstance(greedy, bool)
  # The empty context is the [END] separator.
  assert lm._fit(*lm._encode_pair("", "hello world"))[0] == [END_ID]


def test_loglikelihood_rolling_is_plain_forward(lm, workdir):
  _, config, params = workdir
  text = "The quick brown fox jumps over the lazy dog."
  ids = lm.tok_encode(text)
  assert len(ids) + 1 <= MAX_LEN
  long_text = " ".join(["some words that repeat a lot"] * 30)
  got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text),
                                  _req("loglikelihood_rolling", long_text)])
  want = _forward_logprobs(params, config, [END_ID] + ids, whole=True).sum()
  assert got[0] == pytest.approx(float(want), abs=1e-4, rel=1e-5)
  assert len(lm.tok_encode(long_text)) > MAX_LEN and np.isfinite(got[1]) and got[1] < got[0]


def test_generate_until_stops_at_stop_string(lm):
  ctx = "Question: What color is the sky?\nAnswer:"
  free = lm.generate_until([_req("generate_until", ctx, {"until": [], "max_gen_toks": 12})])[0]
  assert len(free) >= 4, f"the greedy continuation is too short to test: {free!r}"
  stop = free[2:4]
  cut = lm.generate_until([_req("generate_until", ctx, {"until": [stop], "max_gen_toks": 12}),
                           _req("generate_until", "Other", {"until": ["\n\n"],
                                                            "max_gen_toks": 5})])
  assert cut[0] == free[:free.index(stop)]
  assert stop not in cut[0]
  assert isinstance(cut[1], str)
