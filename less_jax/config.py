"""LESS's configuration: the kernel defaults and `LessTrainConfig`.

A frozen dataclass like pldr_jax's configs (`pldr_jax.config`), bound by gin
only at the entry point (experiments/train_less.py).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pldr_jax.config import check_field_types, check_int
from pldr_jax.errors import ConfigError

if TYPE_CHECKING:
  from less_jax.policies import Policy

__all__ = ["DEFAULT_RANK", "DEFAULT_HIDDEN", "DEFAULT_DROPOUT", "LessTrainConfig"]

# The LESS kernels' defaults (the LESS authors' values).
DEFAULT_RANK = 8        # R, the feature width of phi / psi
DEFAULT_HIDDEN = 512    # R', the hidden width of their MLPs
DEFAULT_DROPOUT = 0.3


@dataclasses.dataclass(frozen=True)
class LessTrainConfig:
  """What a kernel-training run does (bound by gin in experiments/train_less.py only).

  Attributes:
    policy: sparse policy name (`less_jax.POLICY_NAMES`: "h2o", "lambda",
      "sliding_window", ...).
    heavy, recent, sink: the policy's budgets (h2o: heavy + recent; lambda:
      sink + recent; sliding_window: recent). Unused ones stay None.
    rank: R (feature dimension of phi/psi).
    hidden: R' (hidden width of the kernel MLPs).
    share_heads: one kernel per layer shared by its heads (default: per head).
    epochs: number of epochs.
    epoch_steps: training batches per epoch.
    lr: Adam learning rate (halved every `lr_halve_epochs` epochs).
    lr_halve_epochs: epochs between halvings.
    dropout: kernel dropout rate (training only).
    seed: kernel init / dropout seed.
    val_batches: held-out batches of the eval split used for validation.
    batch_size: training batch size (None: the pretraining DataConfig's).
  """

  # The sparse policy the kernels are trained for.
  policy: str = "h2o"
  heavy: int | None = None
  recent: int | None = None
  sink: int | None = None
  # The kernels phi / psi.
  rank: int = DEFAULT_RANK
  hidden: int = DEFAULT_HIDDEN
  share_heads: bool = False
  # The training schedule (the LESS authors' recipe).
  epochs: int = 40
  epoch_steps: int = 16
  lr: float = 1e-3
  lr_halve_epochs: int = 10
  dropout: float = DEFAULT_DROPOUT
  seed: int = 0
  val_batches: int = 4
  batch_size: int | None = None

  def __post_init__(self):
    check_field_types(self)
    for name, minimum in (("rank", 1), ("hidden", 1), ("epochs", 1), ("epoch_steps", 1),
                          ("lr_halve_epochs", 1), ("seed", 0), ("val_batches", 0),
                          ("batch_size", 1)):
      check_int(f"LessTrainConfig.{name}", getattr(self, name), minimum, optional=True)
    if not self.lr > 0:
      raise ConfigError(f"LessTrainConfig.lr must be > 0, got {self.lr!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"LessTrainConfig.dropout must lie in [0, 1), got {self.dropout!r}")
    self.make_policy()  # validates the policy name and budgets

  def policy_kwargs(self) -> dict:
    return {k: getattr(self, k) for k in ("heavy", "recent", "sink")
            if getattr(self, k) is not None}

  def make_policy(self, max_len: int | None = None) -> Policy:
    from less_jax import policies  # here: this module stays free of jax
    return policies.make_policy(self.policy, max_len=max_len, **self.policy_kwargs())

  def run_name(self) -> str:
    """`<policy kind>_<budget>`, the directory name under <workdir>/less_kernels."""
    p = self.make_policy()
    return f"{p.kind}_{p.budget}"
