"""experiments/plot_runs.py: curves of several runs and their final numbers."""

import json
import math

import pytest

from helpers import load_script

pr = load_script("experiments/plot_runs.py")


def _run(root, name, losses, evals, norms):
  wd = root / name
  wd.mkdir()
  lines = [json.dumps({"step": s, "loss": l, "grad_norm": g})
           for s, l, g in zip(range(10, 10 * len(losses) + 1, 10), losses, norms)]
  lines += [json.dumps({"step": s, "eval": {"loss": l}}) for s, l in evals]
  lines += ["garbage", json.dumps({"step": 20, "loss": 9.9, "grad_norm": 1.0})]  # a resume rewrote 20
  (wd / "metrics.jsonl").write_text("\n".join(lines))
  return wd


def test_summary_and_plot(tmp_path, capsys):
  a = _run(tmp_path, "a", [5.0, 4.0, 3.5], [(20, 4.2), (30, 3.9)], [2.0, 7.0, 1.0])
  b = _run(tmp_path, "b", [5.0, 4.5], [(20, 4.4)], [0.5, 0.7])
  out = tmp_path / "c.png"
  assert pr.main([str(a), str(b), "--labels", "x,y", "--out", str(out),
                  "--json", str(tmp_path / "s.json")]) == 0
  rows = json.loads((tmp_path / "s.json").read_text())
  assert rows[0] == {"run": "x", "last_step": 30, "eval_step": 30, "eval_loss": 3.9,
                     "eval_perplexity": pytest.approx(math.exp(3.9)), "max_grad_norm": 2.0}
  assert rows[1]["eval_loss"] == 4.4 and rows[1]["max_grad_norm"] == 1.0
  assert out.stat().st_size > 5000
  assert "validation loss 3.9000" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="--labels"):
    pr.main([str(a), "--labels", "x,y", "--out", str(out)])
