"""Sparse KV-cache policies: which tokens stay in a fixed-size cache.

A policy is a small frozen (hashable) dataclass, so it can be a static argument
of `jax.jit`. It has

  * `budget`: the number of cache slots T it needs (static);
  * `victim(pos, score, new_pos) -> slot`: given the metadata of a *full* cache
    it picks the slot whose token leaves when the token at `new_pos` arrives;
  * `with_extra(extra)`: the same policy with `extra` more slots ("Baseline+");
  * `static_mask(seq_len)`: the causal kept-set mask in closed form, or None
    when the policy depends on attention scores (H2O).

The model never looks inside a policy: it only passes it to
`less_jax.cache.sparse_decode_step` / `sparse_prefill` /
`less_jax.parallel.less_attention_parallel`. A new policy is a new subclass of
`Policy` with these members.

Semantics shared by every policy (and by the decode, prefill and parallel forms):

  The cache holds at most T = budget *past* tokens. Query t attends to
  C_t = cache_{t-1} U {t} (causal attention includes the token itself), so it
  sees up to T + 1 keys. Afterwards token t is inserted: into the first empty
  slot while there is one; otherwise the policy picks a victim among the T old
  slots, the victim's (k, v) leaves (and is folded into the LESS state exactly
  once) and token t takes its slot. The newest token is never the victim
  (every policy here keeps `recent >= 1` newest tokens, token t included).

  H2O(heavy, recent): per head; each cached key carries the running sum of the
  softmax attention (over C_t, sparse part only, fp32) it received from every
  query so far, its own query and prefill rows included. The victim is, among
  the old slots that are not in the `recent` newest tokens (token t counts as
  one of them), the one with the smallest score; ties go to the oldest token.
  A victim's score is dropped. This is the greedy causal H2O of the spec: the
  kept set seen by query t is built from scores accumulated over queries < t.
  After each step the cache = `recent` newest tokens + `heavy` heavy hitters.

  LambdaMask(sink, recent): keeps the first `sink` tokens and the `recent`
  newest; the victim is the oldest non-sink token. Query t sees
  {j < sink} U {t - recent <= j <= t}.

  SlidingWindow(recent): keeps the `recent` newest; query t sees
  {t - recent <= j <= t}.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from less_jax.errors import PolicyError
from pldr_jax.config import check_int

__all__ = [
    "Policy",
    "H2O",
    "LambdaMask",
    "SlidingWindow",
    "h2o",
    "lambda_mask",
    "sliding_window",
    "baseline_plus",
    "make_policy",
    "insert_token",
    "POLICY_NAMES",
]

_BIG_POS = np.iinfo(np.int32).max




def _check_int(name: str, value: Any, minimum: int) -> int:
  why = (" (the newest token always stays in the cache, so the budget is >= 1)"
         if name == "recent" else "")
  return check_int(name, value, minimum, error=PolicyError, hint=why)


@dataclasses.dataclass(frozen=True)
class Policy:
  """Base class of sparse policies (see the module docstring)."""

  kind: ClassVar[str] = "abstract"

  @property
  def budget(self) -> int:
    """Number of cache slots T (past tokens kept)."""
    raise NotImplementedError

  def victim(self, pos: jnp.ndarray, score: jnp.ndarray,
             new_pos: jnp.ndarray) -> jnp.ndarray:
    """Slot to evict from a full cache when the token at `new_pos` arrives.

    Args:
      pos: [..., T] int32 token position held by each slot (all >= 0 here).
      score: [..., T] float32 accumulated H2O score of each slot (already
        including the attention of the query at `new_pos`).
      new_pos: [...] int32 position of the arriving token.

    Returns:
      [...] int32 slot index in [0, T).
    """
    raise NotImplementedError

  def with_extra(self, extra: int) -> "Policy":
    """The same policy with `extra` more slots (Baseline+)."""
    raise NotImplementedError

  def static_mask(self, seq_len: int) -> np.ndarray | None:
    """[S, S] bool kept-set mask (row = query t, column = key j), or None."""
    return None

  def check_context(self, max_len: int | None) -> None:
    """Raises PolicyError if the budget does not fit a context of max_len."""
    if max_len is None:
      return
    max_len = _check_int("max_len", max_len, 1)
    if self.budget > max_len:
      raise PolicyError(
          f"{self!r} needs {self.budget} cache slots but the context is only "
          f"{max_len} tokens long: such a cache never evicts anything; use "
          f"full attention or a budget <= {max_len}")

  @property
  def uses_scores(self) -> bool:
    """Whether `victim` reads the H2O scores."""
    return False


@dataclasses.dataclass(frozen=True)
class H2O(Policy):
  """Heavy hitters + recent window (per head). budget = heavy + recent."""

  heavy: int
  recent: int
  kind: ClassVar[str] = "h2o"

  def __post_init__(self):
    object.__setattr__(self, "heavy", _check_int("heavy", self.heavy, 0))
    object.__setattr__(self, "recent", _check_int("recent", self.recent, 1))

  @property
  def budget(self) -> int:
    return self.heavy + self.recent

  @property
  def uses_scores(self) -> bool:
    return True

  def victim(self, pos, score, new_pos):
    # Old slots among the `recent` newest tokens (token new_pos is the newest).
    is_recent = pos > (new_pos[..., None] - self.recent)
    key = jnp.where(is_recent, jnp.inf, score)
    best = jnp.min(key, axis=-1, keepdims=True)
    tie = (key == best) & ~is_recent
    # Among equal scores, evict the oldest token.
    return jnp.argmin(jnp.where(tie, pos, _BIG_POS), axis=-1).astype(jnp.int32)

  def with_extra(self, extra):
    extra = _check_int("extra", extra, 0)
    # Keep the paper's equal heavy/recent split: heavy gets the odd slot.
    return H2O(self.heavy + (extra + 1) // 2, self.recent + extra // 2)


@dataclasses.dataclass(frozen=True)
class LambdaMask(Policy):
  """Λ-masking / StreamingLLM: `sink` first tokens + `recent` newest."""

  sink: int = 4
  recent: int | None = None
  kind: ClassVar[str] = "lambda"

  def __post_init__(self):
    if self.recent is None:
      raise PolicyError("LambdaMask needs `recent` (the number of newest tokens kept)")
    object.__setattr__(self, "sink", _check_int("sink", self.sink, 0))
    object.__setattr__(self, "recent", _check_int("recent", self.recent, 1))

  @property
  def budget(self) -> int:
    return self.sink + self.recent

  def victim(self, pos, score, new_pos):
    del score, new_pos
    key = jnp.where(pos < self.sink, _BIG_POS, pos)
    return jnp.argmin(key, axis=-1).astype(jnp.int32)

  def with_extra(self, extra):
    extra = _check_int("extra", extra, 0)
    return LambdaMask(self.sink, self.recent + extra)

  def static_mask(self, seq_len):
    t = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    return (j <= t) & ((j < self.sink) | (j >= t - self.recent))


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Policy):
  """The `recent` newest tokens only. budget = recent."""

  recent: int
  kind: ClassVar[str] = "sliding_window"

  def __post_init__(self):
    object.__setattr__(self, "recent", _check_int("recent", self.recent, 1))

  @property
  def budget(self) -> int:
    return self.recent

  def victim(self, pos, score, new_pos):
    del score, new_pos
    return jnp.argmin(pos, axis=-1).astype(jnp.int32)

  def with_extra(self, extra):
    extra = _check_int("extra", extra, 0)
    return SlidingWindow(self.recent + extra)

  def static_mask(self, seq_len):
    t = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    return (j <= t) & (j >= t - self.recent)


def h2o(heavy: int, recent: int) -> H2O:
  """H2O policy keeping `heavy` heavy hitters + `recent` newest tokens."""
  return H2O(heavy, recent)


def lambda_mask(sink: int = 4, recent: int | None = None) -> LambdaMask:
  """Λ-masking (StreamingLLM): `sink` first tokens + `recent` newest."""
  return LambdaMask(sink, recent)


def sliding_window(recent: int) -> SlidingWindow:
  """Sliding window of the `recent` newest tokens."""
  return SlidingWindow(recent)


def baseline_plus(policy: Policy, extra: int) -> Policy:
  """"Baseline+": `policy` with `extra` more slots.

  The paper gives the sparse policy R/2 extra tokens, the memory of the LESS
  state (H [R, D] + z [R] per head ~ R/2 tokens of k and v). H2O splits the
  extra slots evenly between heavy and recent (heavy gets the odd one);
  Λ-masking and the sliding window give them to the recent window.
  """
  if not isinstance(policy, Policy):
    raise PolicyError(f"baseline_plus needs a Policy, got {policy!r}")
  return policy.with_extra(extra)


_REGISTRY = {
    "h2o": H2O,
    "lambda": LambdaMask,
    "lambda_mask": LambdaMask,
    "streaming": LambdaMask,
    "streamingllm": LambdaMask,
    "sliding_window": SlidingWindow,
    "sliding": SlidingWindow,
    "window": SlidingWindow,
}
POLICY_NAMES = tuple(sorted(_REGISTRY))


def make_policy(name: str, *, max_len: int | None = None, extra: int = 0,
                **kwargs) -> Policy:
  """Builds a policy by name, e.g. make_policy("h2o", heavy=102, recent=102).

  Args:
    name: one of POLICY_NAMES (case-insensitive; "-" and " " read as "_").
    max_len: if given, the context length the budget must fit in.
    extra: Baseline+ slots added with `baseline_plus` (0: none).
    **kwargs: the policy's fields (h2o: heavy, recent; lambda: sink, recent;
      sliding_window: recent).
  """
  if not isinstance(name, str):
    raise PolicyError(f"policy name must be a string, got {name!r}")
  key = name.strip().lower().replace("-", "_").replace(" ", "_")
  if key not in _REGISTRY:
    raise PolicyError(
        f"unknown sparse policy {name!r}; known: {', '.join(POLICY_NAMES)}")
  cls = _REGISTRY[key]
  fields = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise PolicyError(
        f"policy {name!r} takes {fields}, got unknown argument(s) {unknown}")
  try:
    policy = cls(**kwargs)
  except TypeError as e:
    raise PolicyError(f"policy {name!r} needs arguments {fields}: {e}") from e
  if extra:
    policy = baseline_plus(policy, extra)
  policy.check_context(max_len)
  return policy


def insert_token(policy: Policy, pos: jnp.ndarray, score: jnp.ndarray,
                 p_slots: jnp.ndarray, p_new: jnp.ndarray,
                 new_pos: jnp.ndarray, active: jnp.ndarray):
  """Cache-metadata transition for one token (shared by every form).

  Adds the query's attention to the scores, then places the new token: first
  empty slot if any, else the policy's victim slot.

  Args:
    policy: the sparse policy (static).
    pos: [B, H, T] int32 slot positions (-1: empty).
    score: [B, H, T] float32 accumulated scores.
    p_slots: [B, H, T] float32 softmax attention of the new query on each slot
      (0 on empty slots).
    p_new: [B, H] float32 attention of the new query on itself.
    new_pos: [B, H] int32 position of the new token.
    active: [B, H] bool; where False nothing changes.

  Returns:
    pos [B, H, T], score [B, H, T], slot [B, H] int32 (the slot written),
    evict [B, H] bool (whether the slot's previous token left the cache).
  """
  t_slots = pos.shape[-1]
  valid = pos >= 0
  score = jnp.where(valid & active[..., None], score + p_slots, score)
  full = jnp.all(valid, axis=-1)
  first_empty = jnp.argmax(~valid, axis=-1).astype(jnp.int32)
  victim = policy.victim(pos, score, new_pos)
  slot = jnp.where(full, victim, first_empty).astype(jnp.int32)
  evict = full & active
  write = (jnp.arange(t_slots, dtype=jnp.int32) == slot[..., None]) & active[..., None]
  pos = jnp.where(write, new_pos[..., None].astype(pos.dtype), pos)
  score = jnp.where(write, p_new[..., None].astype(score.dtype), score)
  return pos, score, slot, evict
