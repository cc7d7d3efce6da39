"""Every error pldr-jax raises on purpose, under one base class.

    except pldr_jax.errors.PldrError      # anything the library refused, with a message
                                          # that names the problem

Each class also derives from the builtin a caller would expect (ValueError for
bad arguments, RuntimeError for a run that cannot go on), so existing
`except ValueError` code keeps working.
"""

from __future__ import annotations

import os

__all__ = ["PldrError", "ConfigError", "InputError", "DataError", "GShapeError",
           "CheckpointError", "CheckpointCorrupt", "CheckpointMismatch", "TrainingError"]


class PldrError(Exception):
  """Base of every error raised on purpose by pldr_jax and its plugins (less_jax.errors)."""


class ConfigError(PldrError, ValueError):
  """A configuration that cannot work; the message names the field."""


class InputError(PldrError, ValueError):
  """Tokens, lengths or prompts the model cannot take."""


class DataError(PldrError, ValueError):
  """A corpus, dataset or tokenizer that cannot be used."""


class GShapeError(PldrError, ValueError):
  """A given G_LM whose shape or dtype does not fit the model."""


class CheckpointError(PldrError, ValueError, RuntimeError):
  """A checkpoint or state dict that cannot be saved, read or used.

  CheckpointError(message) or CheckpointError(path, reason); `path` is the
  directory or file concerned (None if not known), `reason` what went wrong.
  """

  def __init__(self, *args):
    if len(args) == 2:
      path, reason = args
      self.path = os.fspath(path)
      self.reason = str(reason)
      super().__init__(f"{reason} [checkpoint path: {self.path}]")
    else:
      self.path = None
      self.reason = str(args[0]) if args else ""
      super().__init__(*args)


class CheckpointCorrupt(CheckpointError):
  """A damaged checkpoint: files missing, corrupt, incomplete or unreadable (a
  resuming run falls back to an older step)."""


class CheckpointMismatch(CheckpointError):
  """A sound checkpoint that does not fit what was asked of it: another tree
  structure, shape or dtype, or an item the step was saved without."""


class TrainingError(PldrError, RuntimeError):
  """A run that cannot go on (NaN/inf loss, ...); saved checkpoints stay as they were."""
