"""The gin configurables of a LESS kernel-training run, registered once per process.

`experiments/train_less.py` reads `experiments/configs/less_*.gin`:
LessTrainConfig.* and less_experiment.* (the frozen model's workdir, its step,
the kernels' folder). Gin allows one registration per name and process, so they
live here, in the package, as pldr_jax's own live in `pldr_jax.gin_configs`.
"""

from __future__ import annotations

import gin

from less_jax.config import LessTrainConfig

__all__ = ["less_experiment"]

gin.external_configurable(LessTrainConfig, "LessTrainConfig")


@gin.configurable
def less_experiment(train: LessTrainConfig = gin.REQUIRED, model_workdir: str = gin.REQUIRED,
                    step: int | None = None, out_dir: str | None = None):
  """model_workdir: a pretraining workdir (its checkpoints/ hold the frozen model).
  step: checkpoint step (None: the latest). out_dir: where the kernels go
  (None: <model_workdir>/less_kernels/<policy>_<budget>)."""
  return dict(train=train, model_workdir=model_workdir, step=step, out_dir=out_dir)
