"""Every experiments/configs/*.gin parses and builds its configs: PLDRConfig,
TrainConfig and DataConfig (pldr_jax.config) through `pldr_jax.gin_configs.experiment`,
LessTrainConfig (less_jax.config) through `less_jax.gin_configs.less_experiment`.

The configurables live in the packages (registered once per process on import), so the
files are parsed here, in the test's process.
"""

import dataclasses
from pathlib import Path

import gin

from less_jax import gin_configs as less_gin_configs
from pldr_jax import gin_configs

REPO = Path(__file__).resolve().parents[1]
GIN_FILES = sorted((REPO / "experiments" / "configs").glob("*.gin"))


def _build(path: Path) -> dict:
  """{name: (module, class, fields)} of the configs the file's experiment builds."""
  with gin.unlock_config():  # a parse in an earlier test may have locked it
    gin.clear_config()
    gin_configs.add_search_paths()
    gin.parse_config_file(str(path))
    less = "less_experiment." in path.read_text()
    run = less_gin_configs.less_experiment() if less else gin_configs.experiment()
    gin.clear_config()
  return {k: (type(v).__module__, type(v).__name__, dataclasses.asdict(v))
          for k, v in run.items() if dataclasses.is_dataclass(v)}


def test_every_gin_file_parses_and_builds_its_configs():
  assert len(GIN_FILES) >= 5
  got = {f.name: _build(f) for f in GIN_FILES}
  pretrain = {"model": "PLDRConfig", "train": "TrainConfig", "data": "DataConfig"}
  less = {"train": "LessTrainConfig"}
  seen = []
  for name, configs in got.items():
    kinds = {k: cls for k, (_, cls, _) in configs.items()}
    assert kinds in (pretrain, less), (name, kinds)
    seen.append(kinds == less)
    # One home for every config class: pldr_jax's in pldr_jax.config, LESS's in less_jax.config.
    home = "less_jax.config" if kinds == less else "pldr_jax.config"
    assert {mod for mod, _, _ in configs.values()} == {home}, name
  assert any(seen) and not all(seen)
  # Bindings reach the fields (tiny.gin and what includes it; a LESS file).
  assert got["tiny.gin"]["model"][2]["d_model"] == 128
  assert got["tiny.gin"]["data"][2]["seq_len"] == 128
  assert got["tiny_dag.gin"]["train"][2]["dag_coeff"] > 0
  assert got["tiny_g_identity.gin"]["model"][2]["g_mode"] == "identity"
  assert got["less_tiny.gin"]["train"][2]["heavy"] == 16
