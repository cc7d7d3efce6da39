"""Every experiments/configs/*.gin parses and builds its configs (pldr_jax.config classes).

The gin configurables are registered by the entry scripts (experiments/pretrain.py
binds PLDRConfig, TrainConfig, DataConfig; experiments/train_less.py binds
LessTrainConfig), and gin refuses to register a name twice, so the files are
parsed in one child process that imports both scripts once.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIN_FILES = sorted((REPO / "experiments" / "configs").glob("*.gin"))

_CHILD = r"""
import dataclasses, importlib.util, json, sys
from pathlib import Path
import gin

def load(name):
  path = Path("experiments") / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"gin_check_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod

pretrain, train_less = load("pretrain"), load("train_less")
out = {}
for f in sys.argv[1:]:
  gin.clear_config()
  gin.parse_config_file(f)
  text = Path(f).read_text()
  run = train_less.less_experiment() if "less_experiment." in text else pretrain.experiment()
  out[Path(f).name] = {k: [type(v).__module__, type(v).__name__, dataclasses.asdict(v)]
                       for k, v in run.items() if dataclasses.is_dataclass(v)}
print("RESULT " + json.dumps(out))
"""


def test_every_gin_file_parses_and_builds_its_configs():
  assert len(GIN_FILES) >= 5
  proc = subprocess.run([sys.executable, "-c", _CHILD, *map(str, GIN_FILES)], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  got = json.loads(line[len("RESULT "):])
  assert sorted(got) == sorted(f.name for f in GIN_FILES)
  pretrain = {"model": "PLDRConfig", "train": "TrainConfig", "data": "DataConfig"}
  less = {"train": "LessTrainConfig"}
  seen = []
  for name, configs in got.items():
    kinds = {k: cls for k, (_, cls, _) in configs.items()}
    assert kinds in (pretrain, less), (name, kinds)
    seen.append(kinds == less)
    # One home for every config class.
    assert {mod for mod, _, _ in configs.values()} == {"pldr_jax.config"}, name
  assert any(seen) and not all(seen)
  # Bindings reach the fields (tiny.gin and what includes it; a LESS file).
  assert got["tiny.gin"]["model"][2]["d_model"] == 128
  assert got["tiny.gin"]["data"][2]["seq_len"] == 128
  assert got["tiny_dag.gin"]["train"][2]["dag_coeff"] > 0
  assert got["tiny_g_identity.gin"]["model"][2]["g_mode"] == "identity"
  assert got["less_tiny.gin"]["train"][2]["heavy"] == 16
