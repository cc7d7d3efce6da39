#!/usr/bin/env python
"""The authors' PyTorch PLDR-LLM against pldr-jax: same weights, same inputs, timed in alternation.

The authors' code is not part of pldr-jax, and nothing else imports it. Fetch it
and its one extra dependency (torchtune's rotary embedding) yourself:

  git clone https://github.com/burcgokden/PLDR-LLM-with-KVG-cache /tmp/pldr-kvg
  pip install torch torchtune torchao
  python -m benchmarks.vs_authors --authors_src /tmp/pldr-kvg/src/pldr_model_v510 \\
      --out benchmarks/results/vs_authors_<date>.json

--authors_src is the folder that holds pldr_model_v510.py and
power_law_attention_layer_v510.py (a folder on sys.path that provides
`torchtune.modules.RotaryPositionalEmbeddings` also works: add it with
--extra_path).

The published 110M configuration, float32 on the CPU, the weights drawn by
pldr-jax's init and exported with `compat.keys.params_to_state_dict` (the authors'
model loads them with strict=True). Issue 13's table, each section in one
process, the two implementations alternating round by round (their order
swapped every round) with the median of each side reported:

- train: one optimizer step on [4, 256] tokens; MFU = model FLOP/s
  (`train.flops_per_token`) over the fp32 matmul rate measured in the process. The authors' `dist_train_step`
  without FSDP and autocast (neither applies to one CPU process): look-ahead and
  padding mask, masked cross-entropy, backward, `clip_grad_value_(1.0)`,
  AdamW(betas 0.9/0.95, eps 1e-5, weight decay 0.1). pldr-jax: its jitted train
  step with the same recipe (`train.make_train_step`). Both read tokens[:, :-1]
  and predict tokens[:, 1:]; tokens/s counts batch x 256 for both. The first
  step's losses are reported side by side (the same model and batch).
- decode: KV+G-cache greedy decoding after a 128-token prompt at batch 1 and 8;
  64 steps timed (tokens/s = batch x 64 / time), prefill not included. The
  authors' cached call as their `generate_text` makes it (token [B, 1], no mask,
  kvcachelst and Gcachelst from the previous call); pldr-jax: `decode_step_jit`
  over `decode_params`. `same_tokens`: both chose the same 64 tokens per row.
- prefill: one forward over a 128-token prompt at batch 1 (the authors' first
  `generate_text` call, its LM head over every position) against
  `decode.prefill_jit(all_logits=False)` as pldr-jax's generate runs it (the
  head at the last position only).
- generate: 64 new tokens after a 128-token prompt, prefill included: the
  authors' `generate_text` loop restated without its tokenizer (top_k=1 and
  their Categorical draw, so greedy; no end-of-text stop) against
  `generate.generate` with greedy sampling.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, train_bench
from pldr_jax import config as cfg
from pldr_jax.compat import keys as compat_keys
from pldr_jax.inference import decode, generate
from pldr_jax.training import host, train
from pldr_jax.params import init_params

AUTHORS_FILES = ("pldr_model_v510.py", "power_law_attention_layer_v510.py")
SECTIONS = ("train", "decode", "prefill", "generate")
PROMPT, NEW = 128, 64


class SetupError(Exception):
  """The authors' code or its dependencies are not where the command says."""


def load_authors(src: str, extra_path: list[str]):
  """Import the authors' model module from `src`; SetupError names what is missing."""
  folder = Path(src)
  missing = [f for f in AUTHORS_FILES if not (folder / f).is_file()]
  if missing:
    raise SetupError(f"--authors_src {src}: no {', '.join(missing)} there (the folder "
                     "src/pldr_model_v510 of github.com/burcgokden/PLDR-LLM-with-KVG-cache)")
  for p in [str(folder), *extra_path]:
    if p not in sys.path:
      sys.path.insert(0, p)
  try:
    importlib.import_module("torch")
    return importlib.import_module("pldr_model_v510")
  except ImportError as e:
    raise SetupError(f"the authors' code needs {e.name or e}: pip install torch torchtune "
                     "torchao (or --extra_path to a folder that provides it)") from e


def authors_model(mod, c: cfg.PLDRConfig, state_dict: dict):
  import torch
  m = mod.PLDR_Model(num_layers=c.num_layers, d_model=c.d_model, num_heads=c.num_heads,
                     dff=c.d_ff, input_vocab_size=c.vocab_size, A_dff=c.a_dff,
                     num_reslayerA=c.num_res_units, num_denseA=2, max_seq_len=4096)
  m.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()}, strict=True)
  return m


def look_ahead_mask(tokens):
  """The authors' create_masks: max(padding mask [B,1,1,S], look-ahead [S,S])."""
  import torch
  s = tokens.shape[1]
  pad = torch.eq(tokens, 0).to(torch.float32)[:, None, None, :]
  return torch.maximum(pad, 1 - torch.tril(torch.ones((s, s))))


def alternate(fns: dict, rounds: int, pause_s: float = 0.2) -> dict[str, list[float]]:
  """Time each fn (which blocks until its result exists) once per round, their
  order swapped every round; a pause before each lets the other library's
  worker threads go idle. A fn that times part of its own work returns those
  seconds (a float), which are taken instead of the whole call's."""
  times = {k: [] for k in fns}
  names = list(fns)
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      time.sleep(pause_s)
      t0 = time.perf_counter()
      own = fns[name]()
      times[name].append(own if isinstance(own, float) else time.perf_counter() - t0)
  return times


def _row(section: str, work: float, unit: str, times: dict, **extra) -> dict:
  a, j = float(np.median(times["authors"])), float(np.median(times["pldr_jax"]))
  return {"section": section, "unit": unit, "authors_s": a, "pldr_jax_s": j,
          "authors_rate": work / a, "pldr_jax_rate": work / j, "ratio": a / j,
          "rounds": len(times["authors"]), "authors_times": times["authors"],
          "pldr_jax_times": times["pldr_jax"], **extra}


def bench_train(mod, c, rounds: int, batch: int = 4, seq: int = 256) -> dict:
  import torch
  tc, tx, mesh, toks, data = train_bench.setup(c.vocab_size, batch, seq)
  with jax.set_mesh(mesh):
    state = train.init_train_state(c, tc, tx, mesh)
    sd = compat_keys.params_to_state_dict(jax.device_get(state["params"]), c)
    m = authors_model(mod, c, sd)
    step = train.make_train_step(c, tc, tx, mesh)
    opt = torch.optim.AdamW(m.parameters(), lr=tc.learning_rate, betas=(tc.beta1, tc.beta2),
                            eps=tc.eps, weight_decay=tc.weight_decay)
    inp = torch.from_numpy(toks.astype(np.int64))
    tar_inp, tar_real = inp[:, :-1], inp[:, 1:]
    mask = look_ahead_mask(tar_inp)

    def authors_step():  # their dist_train_step on one CPU process
      opt.zero_grad()
      m.train()
      pred = m([tar_inp, mask], kvcachelst=None, Gcachelst=None)[0]
      keep = torch.ne(tar_real, 0).to(pred.dtype)
      loss = torch.sum(torch.nn.functional.cross_entropy(
          pred.permute(0, 2, 1), tar_real, reduction="none") * keep) / torch.sum(keep)
      loss.backward()
      torch.nn.utils.clip_grad_value_(m.parameters(), clip_value=tc.clip_value)
      opt.step()
      return loss.item()

    box = {"state": state}

    def jax_step():
      box["state"], metrics = step(box["state"], data)
      return float(metrics["loss"])

    first = {"authors": authors_step(), "pldr_jax": jax_step()}
    for _ in range(2):  # untimed: allocator and thread pools settle
      authors_step(), jax_step()
    times = alternate({"authors": authors_step, "pldr_jax": jax_step}, rounds)
  # Both run the same model FLOPs: a rate over the machine's matmul rate (the suite's
  # 2048^2 product, fp32, measured here) is the MFU each implementation reaches.
  row = _row("train", batch * seq, "tokens/s", times, batch=batch, seq=seq,
             first_step_loss=first, flops_per_token=train.flops_per_token(c, seq),
             matmul_flops_per_s=common.matmul_rate(n=2048)["float32"])
  for side in ("authors", "pldr_jax"):
    row[f"{side}_mfu"] = row[f"{side}_rate"] * row["flops_per_token"] / row["matmul_flops_per_s"]
  return row


def _jax_decoder(p, c, batch: int):
  sp = decode.decode_params(p, c, batch=batch)
  cl = generate.auto_cache_len(PROMPT, NEW, c)

  def run(prompts: np.ndarray, steps: int = NEW):
    """Prefill (not timed by the caller's split) then `steps` greedy steps."""
    toks = jnp.asarray(prompts, jnp.int32)
    lens = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
    lg, st, gc = decode.prefill_jit(p, toks, lens, config=c, cache_len=cl, all_logits=False)
    tok = jnp.argmax(lg, -1).astype(jnp.int32)
    jax.block_until_ready(tok)
    t0 = time.perf_counter()
    out = []
    for _ in range(steps):
      lg, st = decode.decode_step_jit(sp, gc, st, tok, config=c)
      tok = jnp.argmax(lg, -1).astype(jnp.int32)
      out.append(tok)
    out = np.asarray(jnp.stack(out, 1))
    return out, time.perf_counter() - t0
  return run


def _authors_decoder(m):
  import torch

  @torch.no_grad()
  def run(prompts: np.ndarray, steps: int = NEW):
    m.eval()
    x = torch.from_numpy(prompts.astype(np.int64))
    pred, _, att, kv = m([x, look_ahead_mask(x)])
    g = [[t[0], t[4]] for t in att]
    tok = torch.argmax(pred[:, -1], -1, keepdim=True)
    t0 = time.perf_counter()
    out = []
    for _ in range(steps):
      pred, _, att, kv = m([tok, None], kvcachelst=kv, Gcachelst=g)
      g = [[t[0], t[4]] for t in att]
      tok = torch.argmax(pred[:, -1], -1, keepdim=True)
      out.append(tok)
    out = torch.cat(out, 1).numpy()
    return out, time.perf_counter() - t0
  return run


def bench_decode(m, p, c, rounds: int, batch: int) -> dict:
  prompts = np.random.default_rng(batch).integers(4, c.vocab_size, (batch, PROMPT))
  runs = {"authors": _authors_decoder(m), "pldr_jax": _jax_decoder(p, c, batch)}
  toks = {k: f(prompts)[0] for k, f in runs.items()}  # untimed: compiles, same tokens?
  same = [bool(np.array_equal(a, b)) for a, b in zip(toks["authors"], toks["pldr_jax"])]
  # the decode loops' own clocks leave the prefill out
  times = alternate({k: (lambda f=f: f(prompts)[1]) for k, f in runs.items()}, rounds)
  return _row("decode", batch * NEW, "tokens/s", times, batch=batch, prompt=PROMPT,
              same_tokens=same)


def bench_prefill(m, p, c, rounds: int) -> dict:
  import torch
  prompt = np.random.default_rng(1).integers(4, c.vocab_size, (1, PROMPT))
  x = torch.from_numpy(prompt.astype(np.int64))
  toks, lens = jnp.asarray(prompt, jnp.int32), jnp.asarray([PROMPT], jnp.int32)
  cl = generate.auto_cache_len(PROMPT, NEW, c)

  @torch.no_grad()
  def authors():
    m.eval()
    return m([x, look_ahead_mask(x)])[0]

  def ours():
    return jax.block_until_ready(decode.prefill_jit(p, toks, lens, config=c, cache_len=cl,
                                                    all_logits=False))

  authors(), ours()
  times = alternate({"authors": authors, "pldr_jax": ours}, rounds)
  return _row("prefill", PROMPT, "tokens/s", times, batch=1, prompt=PROMPT)


def bench_generate(m, p, c, rounds: int) -> dict:
  import torch
  prompt = np.random.default_rng(2).integers(4, c.vocab_size, PROMPT).tolist()

  @torch.no_grad()
  def authors():  # their generate_text: top_k=1, temperature 1, top_p 1; no end-of-text stop
    m.eval()
    output = torch.tensor(prompt)[None, :]
    seq_in, kv, g = output, None, None
    for _ in range(NEW):
      mask = look_ahead_mask(seq_in) if kv is None else None
      pred, _, att, kv = m([seq_in, mask], kvcachelst=kv, Gcachelst=g)
      g = [[t[0], t[4]] for t in att]
      logits = pred[:, -1, :]
      values, _ = torch.topk(logits, k=1, sorted=True)
      logits = torch.where(logits < values[:, -1, None],
                           torch.ones_like(logits) * -1e10, logits)
      nxt = torch.distributions.categorical.Categorical(logits=logits).sample()[None, :]
      seq_in = nxt
      output = torch.concat([output, nxt], axis=-1)
    return output[0, PROMPT:].tolist()

  def ours():
    return generate.generate(p, [prompt], config=c, max_new_tokens=NEW,
                             sampling=generate.SamplingConfig(), key=jax.random.key(0))[0]

  same = authors() == ours()
  times = alternate({"authors": authors, "pldr_jax": ours}, rounds)
  return _row("generate", NEW, "tokens/s", times, batch=1, prompt=PROMPT, same_tokens=same)


def markdown(rows: list[dict]) -> str:
  lines = ["| work | authors' PyTorch | pldr-jax | pldr-jax / authors | rounds |",
           "|---|---|---|---|---|"]
  for r in rows:
    b = f", batch {r['batch']}" if r["section"] == "decode" else ""
    mfu = (f" (MFU {r['authors_mfu']:.2f})", f" (MFU {r['pldr_jax_mfu']:.2f})") \
        if "authors_mfu" in r else ("", "")
    lines.append(f"| {r['section']}{b}, {r['unit']} | {r['authors_rate']:.1f}{mfu[0]} | "
                 f"{r['pldr_jax_rate']:.1f}{mfu[1]} | {r['ratio']:.2f} | {r['rounds']} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  host.retain_freed_memory()  # as the suite and a decoding process do (pldr_jax.training.host)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--authors_src", required=True,
                  help="folder with pldr_model_v510.py and power_law_attention_layer_v510.py")
  ap.add_argument("--extra_path", action="append", default=[],
                  help="a folder to put on sys.path for the authors' imports (repeatable)")
  ap.add_argument("--sections", default=",".join(SECTIONS),
                  help=f"comma-separated, of {', '.join(SECTIONS)}")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--decode_batches", default="1,8")
  ap.add_argument("--out", default=None, help="write the rows as JSON here")
  a = ap.parse_args(argv)
  sections = [s for s in a.sections.split(",") if s]
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    print(f"vs_authors: unknown section(s) {unknown}; known: {list(SECTIONS)}", file=sys.stderr)
    return 2
  try:
    mod = load_authors(a.authors_src, a.extra_path)
  except SetupError as e:
    print(f"vs_authors: {e}", file=sys.stderr)
    return 2
  import torch
  c = cfg.pldrv51_110m()
  rows = []
  if "train" in sections:
    rows.append(bench_train(mod, c, a.rounds))
    print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("_times")}), flush=True)
  if set(sections) & {"decode", "prefill", "generate"}:
    p = init_params(c, jax.random.key(0))
    m = authors_model(mod, c, compat_keys.params_to_state_dict(p, c))
    todo = ([("decode", lambda b=b: bench_decode(m, p, c, a.rounds, b))
             for b in map(int, a.decode_batches.split(","))]
            + [("prefill", lambda: bench_prefill(m, p, c, a.rounds)),
               ("generate", lambda: bench_generate(m, p, c, a.rounds))])
    for name, fn in todo:
      if name in sections:
        rows.append(fn())
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("_times")}),
              flush=True)
  env = {**common.environment(), "torch": torch.__version__,
         "torch_threads": torch.get_num_threads()}
  print(markdown(rows))
  if a.out:
    Path(a.out).write_text(json.dumps({"config": dataclasses.asdict(c), "environment": env,
                                       "rows": rows}, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
