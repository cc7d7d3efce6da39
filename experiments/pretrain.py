#!/usr/bin/env python
"""Pretrain a PLDR-LLM: `python experiments/pretrain.py --gin_file=experiments/configs/tiny.gin`.

Gin binds the frozen configs here, at the entry point only:
  PLDRConfig.* (model), TrainConfig.* (optimisation, mesh, cadence),
  DataConfig.* (dataset, tokenizer, sequence length, batch) and experiment.*
  (workdir, transferred-G source, samples to print at the end).
An unknown or misspelled binding is an error that names it. With
`DataConfig.dataset = 'pldr_text_corpus'` and no tokenizer given, the
embedded corpus is built into TFDS array_record and a SentencePiece model is
trained on it (cached under <workdir>/data). After training, a few samples are
generated from the saved checkpoint with the KV-cache and G-cache.

Several processes (one per host, or several on one machine):
  python experiments/pretrain.py ... --coordinator_address HOST:PORT \
      --num_processes N --process_id I        (or JAX_COORDINATOR_ADDRESS, ...)
Process 0 builds the dataset and tokenizer; the others wait for it. Only process 0
writes to the console (`--verbose`: every process); errors of any process still go
to its stderr as one line. A process that is lost (killed, crashed, its host gone)
ends the others with one line each, within about a second (a host: within
`--peer_timeout` seconds, default 30) and exit status 75: which process is gone, the
last intact checkpoint and the command that resumes (start every process again with
the command it was started with; see pldr_jax.training.peers).

Ctrl-C or SIGTERM says so at once, saves a checkpoint at the end of the current
step and exits 0; a second one aborts without saving (the checkpoints already
written stay intact). Running the same command again resumes. `--restore_step S`
resumes from step S instead of the newest good checkpoint. An error that is not
a bug is one line on stderr (`--debug` or PLDR_DEBUG=1: the traceback).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from pldr_jax import cli, paths
from pldr_jax.config import DataConfig
from pldr_jax.gin_configs import experiment, resolve_data
from pldr_jax.training import distributed, host

SAMPLE_PROMPTS = ("It is a truth universally acknowledged", "She was", "The weather")


def resume_command(argv: list[str]) -> str:
  """The command line that resumes this run: the same one without --restore_step."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == "--restore_step":
      skip = True
    elif not a.startswith("--restore_step="):
      out.append(a)
  return shlex.join([python_command()] + out)


def python_command() -> str:
  """The interpreter running this script, as the user can type it again: relative to the
  working directory when below it (`.venv/bin/python`), else its absolute path."""
  exe = os.path.abspath(sys.executable)
  rel = os.path.relpath(exe)
  return rel if not rel.startswith("..") else exe


def lost_peer_hint(workdir, argv: list[str]) -> str:
  """The lost-peer line's second half: the newest finished checkpoint (written whole by
  Orbax, so it restores) and the command that resumes."""
  from pldr_jax.training.trainer import newest_step
  ckdir = paths.as_path(workdir) / "checkpoints"
  saved = newest_step(ckdir)
  kept = (f"The last intact checkpoint is step {saved} in {ckdir}" if saved is not None
          else f"No checkpoint was saved yet in {ckdir}")
  return (f"{kept}. To resume, start every process again, on every host, with the command "
          f"it was started with (this one: {resume_command(argv)}).")


def print_samples(run: dict, data: DataConfig) -> None:
  import jax
  from pldr_jax.inference import generate
  from pldr_jax.data import load_tokenizer
  from pldr_jax.training.trainer import restore_for_inference
  config = run["model"]
  ckdir = paths.as_path(run["workdir"]) / "checkpoints"
  params, g_lm, step = restore_for_inference(ckdir, config)
  tok = load_tokenizer(data.tokenizer_path)
  prompts = [[2] + tok.encode(p) for p in SAMPLE_PROMPTS[:run["samples"]]]
  n = min(run["sample_tokens"], config.max_len - max(len(p) for p in prompts))
  sampling = generate.SamplingConfig(temperature=0.8, top_k=40, top_p=0.95, stop_token=3)
  outs = generate.generate(params, prompts, config=config, max_new_tokens=n,
                           key=jax.random.key(0), sampling=sampling, g_lm=g_lm)
  print(f"\nsamples from {ckdir} (step {step}; KV-cache + G-cache, T=0.8, top-k 40, top-p 0.95):")
  for prompt, out in zip(SAMPLE_PROMPTS, outs):
    print(f"  {prompt!r} -> {tok.decode(out)!r}")


def main(argv=None) -> int:
  host.retain_freed_memory()  # before the first JAX computation (pldr_jax.training.host)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", required=True)
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--workdir", default=None, help="overrides experiment.workdir")
  parser.add_argument("--no_progress", action="store_true")
  parser.add_argument("--restore_step", type=int, default=None,
                      help="resume from this checkpoint step (default: the newest good one)")
  parser.add_argument("--verbose", action="store_true",
                      help="every process writes to the console (default: process 0 only)")
  distributed.add_arguments(parser)
  args = parser.parse_args(argv)
  argv = sys.argv if argv is None else [sys.argv[0]] + list(argv)
  cli.parse_gin(args.gin_file, args.gin_param)  # a typo: the closest valid name
  run = experiment()
  if args.workdir:
    run["workdir"] = args.workdir
  # before any data or compile work: a file or an unwritable folder fails now, not later
  cli.check_run_folder(run["workdir"], "--workdir" if args.workdir else "experiment.workdir")
  if run["data_workdir"]:
    cli.check_run_folder(run["data_workdir"], "experiment.data_workdir")
  launch = distributed.resolve(args.coordinator_address, args.num_processes, args.process_id)
  if distributed.launch_index(launch) != 0 and not args.verbose:
    distributed.quiet_stdout()  # process 0 speaks for the run
  from pldr_jax.training import peers
  peers.set_resume_hint(lambda: lost_peer_hint(run["workdir"], argv))
  distributed.initialize(args)
  try:
    code = _train(run, args, argv)
  except BaseException as e:
    distributed.failing(e)  # a lost peer's symptom: the watch names the peer and ends this
    raise
  distributed.leaving()
  return code


def _train(run: dict, args: argparse.Namespace, argv: list[str]) -> int:
  from pldr_jax.training.trainer import newest_step, run_pretraining
  data = resolve_data(run)
  result = run_pretraining(run["model"], run["train"], data, run["workdir"],
                           g_source=run["g_source"], progress=not args.no_progress,
                           restore_step=args.restore_step)
  wd = paths.as_path(run["workdir"])  # local or gs://...
  if result.interrupted:
    saved = newest_step(wd / "checkpoints")
    kept = (f"checkpoint of step {saved} in {wd / 'checkpoints'}" if saved is not None
            else "nothing saved yet")
    print(f"\nstopped by {result.interrupted} at step {result.final_step}; {kept}."
          f"\nresume with: {resume_command(argv)}", flush=True)
    return 0
  loss = "" if result.train_loss is None else f": train loss {result.train_loss:.4f}"
  print(f"\nfinished at step {result.final_step}{loss}")
  if result.eval:
    print(f"validation: loss {result.eval['loss']:.4f}  perplexity {result.eval['perplexity']:.2f}"
          f"  token accuracy {result.eval['accuracy']:.4f}")
  if result.tokens_per_second:
    print(f"throughput: {result.tokens_per_second:,.0f} tokens/s")
  print(f"checkpoints: {wd / 'checkpoints'}\ntensorboard: {wd / 'tensorboard'}\n"
        f"metrics:     {wd / 'metrics.jsonl'}\ndata/tokenizer: {data.data_dir}, {data.tokenizer_path}")
  if run["samples"] > 0:
    print_samples(run, data)
  return 0


if __name__ == "__main__":
  cli.main(main)
