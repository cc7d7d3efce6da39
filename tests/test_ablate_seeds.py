"""experiments/ablate_seeds.py: per-mode mean/spread over seeds and the curve plot."""

import json
import statistics
from pathlib import Path

import pytest

from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
ab = load_script("experiments/ablate_seeds.py")


def _fake_sweep(root: Path, seed: int, losses: dict) -> Path:
  """An ablate.py output dir: ablation.json and per-mode metrics.jsonl."""
  sd = root / f"seed_{seed}"
  rows = []
  for mode, loss in losses.items():
    rows.append({"mode": mode, "final_step": 20, "eval_loss": loss})
    if mode != "inference_only":
      (sd / mode).mkdir(parents=True)
      lines = [json.dumps({"step": s, "eval": {"loss": loss + (20 - s) * 0.1}})
               for s in (10, 20)] + ["not json", json.dumps({"step": 20, "loss": 9.0})]
      (sd / mode / "metrics.jsonl").write_text("\n".join(lines))
  sd.mkdir(parents=True, exist_ok=True)
  (sd / "ablation.json").write_text(json.dumps({"modes": rows}))
  return sd


def test_aggregate_and_plot(tmp_path):
  per_seed = {1: {"learned": 4.5, "identity": 4.6, "inference_only": 7.0},
              2: {"learned": 4.7, "identity": 4.4, "inference_only": None},
              3: {"learned": 4.6, "identity": 4.5, "inference_only": 6.0}}
  dirs = {s: _fake_sweep(tmp_path, s, l) for s, l in per_seed.items()}
  rows = {r["mode"]: r for r in ab.aggregate(dirs)}
  assert set(rows) == {"learned", "identity", "inference_only"}
  lr = rows["learned"]
  assert lr["seeds"] == 3
  assert lr["eval_loss_mean"] == pytest.approx(4.6)
  assert lr["eval_loss_std"] == pytest.approx(statistics.stdev([4.5, 4.7, 4.6]))
  assert (lr["eval_loss_min"], lr["eval_loss_max"]) == (4.5, 4.7)
  assert rows["inference_only"]["seeds"] == 2  # a missing result is not a zero
  assert ab.eval_curve(dirs[1] / "learned") == [(10, pytest.approx(5.5)), (20, 4.5)]
  ab.plot(dirs, list(rows.values()), tmp_path / "p.png")
  assert (tmp_path / "p.png").stat().st_size > 5000
