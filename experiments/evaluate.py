"""Zero-shot lm-eval benchmarks of a pldr-jax checkpoint (the `pldr-jax` lm-eval model).

    python experiments/evaluate.py --checkpoint RUN_DIR \\
        --tasks arc_easy,arc_challenge,piqa,social_iqa,hellaswag,openbookqa,winogrande,truthfulqa_mc2 \\
        [--include_path DIR] [--limit N] [--g_cache on|off|both] [--out results.json]

Each task runs on its own (lm_eval.simple_evaluate with one loaded model per
G-cache mode), so a task whose data cannot be reached (no network, unknown
name) is reported and the others still run. See pldr_jax_lm_eval/model.py for
the scoring semantics (G_LM from the context, held over the continuation).
Exit status: 0 when every task ran, 1 when some failed, 2 when none ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_TASKS = ("arc_easy,arc_challenge,piqa,social_iqa,hellaswag,openbookqa,winogrande,"
                 "truthfulqa_mc2")
MODES = {"on": (True,), "off": (False,), "both": (True, False)}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True,
                 help="run workdir (with checkpoints/) or the checkpoints directory")
  p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated lm-eval task names")
  p.add_argument("--include_path", default=None, help="extra directory of task YAMLs")
  p.add_argument("--no_default_tasks", action="store_true",
                 help="index only --include_path tasks (faster; for local tasks)")
  p.add_argument("--limit", type=float, default=None, help="documents per task (or fraction)")
  p.add_argument("--g_cache", choices=sorted(MODES), default="on")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--max_length", type=int, default=None)
  p.add_argument("--num_fewshot", type=int, default=None)
  p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: from meta)")
  p.add_argument("--bootstrap_iters", type=int, default=0,
                 help="stderr bootstrap iterations (0: none, fast)")
  p.add_argument("--offline", action="store_true",
                 help="HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1: unreachable tasks fail at once "
                      "instead of retrying the network")
  p.add_argument("--out", default=None, help="write results JSON here")
  return p.parse_args(argv)


def _metrics(res: dict) -> dict:
  return {k: v for k, v in res.items() if k != "alias" and isinstance(v, (int, float))}


def main(argv=None) -> int:
  args = parse_args(argv)
  from pldr_jax import cli
  if args.out:
    cli.check_output_file(args.out)  # now, not after the tasks have run
  if args.offline:
    import os
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
  import lm_eval
  from lm_eval.tasks import TaskManager

  from pldr_jax_lm_eval import PLDRJaxLM

  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  limit = args.limit
  if limit is not None and limit >= 1 and float(limit).is_integer():
    limit = int(limit)
  tm = TaskManager(include_path=args.include_path, include_defaults=not args.no_default_tasks)
  from pldr_jax import paths
  where = args.checkpoint if args.checkpoint.startswith("hf:") else str(paths.as_path(args.checkpoint))
  report = {"checkpoint": where, "tasks": tasks,
            "limit": limit, "g_cache": {}, "failed": {}}
  for g in MODES[args.g_cache]:
    mode = "on" if g else "off"
    lm = PLDRJaxLM(checkpoint=args.checkpoint, batch_size=args.batch_size, g_cache=g,
                   max_length=args.max_length, tokenizer=args.tokenizer)
    report.setdefault("step", lm.step)
    report.setdefault("max_length", lm.max_length)
    per_task = report["g_cache"].setdefault(mode, {})
    for task in tasks:
      if task in report["failed"]:
        continue
      t0 = time.time()
      try:
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit,
                                      num_fewshot=args.num_fewshot, log_samples=False,
                                      bootstrap_iters=args.bootstrap_iters)
      except Exception as e:  # data not reachable, unknown task, ...
        msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:500]
        report["failed"][task] = msg
        print(f"[g_cache={mode}] {task}: FAILED ({msg})", file=sys.stderr, flush=True)
        continue
      for name, res in out["results"].items():
        per_task[name] = _metrics(res)
      print(f"[g_cache={mode}] {task}: " + ", ".join(
          f"{k}={v:.4f}" for k, v in sorted(per_task.get(task, {}).items())
          if "stderr" not in k and k != "sample_len") + f"  ({time.time() - t0:.1f}s)", flush=True)

  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
  ran = [t for t in tasks if t not in report["failed"]]
  if report["failed"]:
    print(f"\n{len(report['failed'])} of {len(tasks)} task(s) could not run (data not "
          f"reachable or unknown name); {len(ran)} ran:", file=sys.stderr)
    for t, msg in report["failed"].items():
      print(f"  {t}: {msg}", file=sys.stderr)
  if not ran:
    return 2
  return 1 if report["failed"] else 0


if __name__ == "__main__":
  from pldr_jax import cli
  cli.main(main)
