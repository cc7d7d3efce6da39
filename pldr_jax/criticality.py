"""The SOC order parameter and the collapse statistics measured on a model (JAX).

`criticality(params, config, prompts)` runs the protocol of Gokden, "PLDR-LLMs
Reason At Self-Organized Criticality" (arXiv 2603.23539) on one model: sampled
continuations without any cache (runs 1 and 2), the cached run's tensors, the
audit variant, and the rank-one collapse statistics; `measure_run(source)`
loads a run or a published model and cuts its prompts
(`experiments/criticality.py`, `experiments/criticality_sweep.py`). The
statistics themselves are NumPy float64, in `pldr_jax.analysis`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pldr_jax import errors
from pldr_jax.analysis import (DEDUCTIVE_TENSORS, DEFAULT_RANK_TOL, audit_statistics,
                               collapse_statistics, order_parameter, summarize_audit)

__all__ = ["held_out_prompts", "sample_uncached", "deductive_tensors", "cached_tensors",
           "criticality", "json_ready", "documents_prompts", "measure_run"]


def held_out_prompts(data, tokenizer, prompt_len: int, num_prompts: int,
                     split: str | None = None) -> np.ndarray:
  """int32 [num_prompts, prompt_len] prompts cut from the held-out documents.

  data: the run's DataConfig (its dataset, data_dir and eval_split, or `split`);
  tokenizer: a pldr_jax.data.Tokenizer. Each document is tokenized (no [START],
  as training sees it) and cut into consecutive windows of prompt_len tokens;
  the prompts are the first window of every document, then the second of every
  document, and so on, until num_prompts (so the paper's 'first 200 words of
  each review' when there are enough documents). Raises DataError when the split
  holds fewer windows than asked for.
  """
  from pldr_jax.data import open_data_source
  if prompt_len < 1 or num_prompts < 1:
    raise errors.ConfigError(f"prompt_len and num_prompts must be >= 1, got {prompt_len}, "
                             f"{num_prompts}")
  split = split or data.eval_split
  source = open_data_source(data.dataset, split, data.data_dir, download=data.download)

  def texts():
    for i in range(len(source)):
      text = source[i][data.text_key]
      text = text.item() if isinstance(text, np.ndarray) else text
      yield text.decode("utf-8") if isinstance(text, bytes) else text

  return _windows(texts(), tokenizer, prompt_len, num_prompts,
                  f"split {split!r} of {data.dataset!r}")


def _windows(texts, tokenizer, prompt_len: int, num_prompts: int, where: str) -> np.ndarray:
  """int32 [num_prompts, prompt_len]: consecutive windows of each tokenized text, the
  first window of every text, then the second of every text, ... (DataError if too few)."""
  windows = []
  for text in texts:
    ids = np.asarray(tokenizer.encode(text), np.int32)
    windows.append([ids[j:j + prompt_len] for j in range(0, len(ids) - prompt_len + 1,
                                                          prompt_len)])
  out = []
  for k in range(max((len(w) for w in windows), default=0)):
    out += [w[k] for w in windows if k < len(w)]
  if len(out) < num_prompts:
    raise errors.DataError(f"{where} holds {len(out)} windows of {prompt_len} tokens, fewer "
                           f"than the {num_prompts} prompts asked for: ask for fewer or "
                           "shorter prompts")
  return np.stack(out[:num_prompts]).astype(np.int32)


def _fixed_g(config, g_lm):
  """The G_LM to pass to the model: the given constant, the explicit identity for
  g_mode 'identity' (so that G_LM = I is reported), None for a learned G."""
  if g_lm is not None or config.g_mode != "identity":
    return g_lm
  from pldr_jax import g_modes
  return g_modes.identity_g(config)


def _sample_program():
  import functools

  import jax
  import jax.numpy as jnp

  from pldr_jax import model
  from pldr_jax.config import SamplingPath
  from pldr_jax.inference.generate import sample_logits

  @functools.partial(jax.jit, static_argnames=("config", "prompt_len", "max_new_tokens",
                                               "path"))
  def run(params, buf, key, temperature, top_p, g_lm, *, config, prompt_len, max_new_tokens,
          path):
    b = buf.shape[0]

    def body(i, buf):
      lengths = jnp.full((b,), prompt_len, jnp.int32) + i
      logits, _ = model.forward(params, buf, lengths, config=config, g_lm=g_lm,
                                logits_at_last=lengths)
      tok = sample_logits(logits, jax.random.fold_in(key, i), temperature, top_p, path)
      return jax.lax.dynamic_update_slice(buf, tok[:, None], (0, prompt_len + i))

    return jax.lax.fori_loop(0, max_new_tokens, body, buf)
  del SamplingPath
  return run


_SAMPLER = []


def sample_uncached(params, config, prompts, max_new_tokens: int, key, *,
                    temperature: float = 1.0, top_p: float = 0.8, g_lm=None) -> np.ndarray:
  """Sample continuations without any KV- or G-cache: every new token comes from a
  full forward pass over the prompt and the tokens generated so far (so with a
  learned G, G_LM is rebuilt from the whole sequence at every step, as the
  authors' uncached decoding does). prompts: int [N, P] (all of length P);
  fixed length, no stop token. Returns int32 [N, P + max_new_tokens].
  """
  import jax.numpy as jnp

  from pldr_jax.config import SamplingConfig
  from pldr_jax import model
  prompts = np.asarray(prompts)
  model.check_inputs(prompts, None, config)
  prompts = prompts.astype(np.int32)
  n, p = prompts.shape
  if p + max_new_tokens > config.max_len:
      raise errors.InputError(f"prompt of {p} tokens plus {max_new_tokens} new tokens exceeds the "
                            f"context length {config.max_len}")
  s = SamplingConfig(temperature=temperature, top_p=top_p)
  buf = np.zeros((n, p + max_new_tokens), np.int32)
  buf[:, :p] = prompts
  if not _SAMPLER:
    _SAMPLER.append(_sample_program())
  g = _fixed_g(config, g_lm)
  out = _SAMPLER[0](params, jnp.asarray(buf), key, jnp.float32(temperature), jnp.float32(top_p),
                    g, config=config, prompt_len=p, max_new_tokens=max_new_tokens, path=s.path)
  return np.asarray(out)


_DEDUCTIVE = []


def deductive_tensors(params, config, tokens, g_lm=None) -> dict[str, np.ndarray]:
  """{A, A_LM, A_P, G_LM: float64 [N, L, H, dk, dk]} of whole sequences (int [N, S], no
  padding) from one uncached forward pass (non-causal metric: the tensors after
  the last token). A fixed-G model has G_LM only (the identity for 'identity')."""
  import jax

  from pldr_jax import model
  if config.causal_metric:
      raise errors.ConfigError("the criticality statistics are defined for the reference "
                             "(non-causal) metric; this model has PLDRConfig.causal_metric=True")
  if not _DEDUCTIVE:
    _DEDUCTIVE.append(jax.jit(
        lambda p, t, g, config: model.forward(p, t, config=config, g_lm=g,
                                              return_deductive=True)[1],
        static_argnames=("config",)))
  tokens = np.asarray(tokens)
  model.check_inputs(tokens, None, config)  # concrete checks, skipped inside the jit
  ded = _DEDUCTIVE[0](params, tokens.astype(np.int32), _fixed_g(config, g_lm), config)
  return {k: np.stack([np.asarray(d[k], np.float64) for d in ded], axis=1)
          for k in DEDUCTIVE_TENSORS if k in ded[0]}


def cached_tensors(params, config, prompts, g_lm=None) -> dict[str, np.ndarray]:
  """The cached run's tensors after the last prompt token: G_LM as the G-cache holds
  it (inference.decode.prefill with the G-cache), and A, A_LM, A_P from the same
  forward pass over the prompt alone that the prefill runs (the ones the G-cache
  does not keep); float64 [N, L, H, dk, dk]."""
  import jax.numpy as jnp

  from pldr_jax.inference import decode
  prompts = np.asarray(prompts, np.int32)
  n, p = prompts.shape
  g = _fixed_g(config, g_lm)
  _, _, gcache = decode.prefill_jit(params, jnp.asarray(prompts), jnp.full((n,), p, jnp.int32),
                                    g, config=config, cache_len=p, g_cache=True)
  swap = lambda x: np.swapaxes(np.asarray(x, np.float64), 0, 1)  # [L, N, ...] -> [N, L, ...]
  out = deductive_tensors(params, config, prompts, g_lm)  # A_P (and the same A, A_LM, G_LM)
  out["G_LM"] = swap(gcache.g_lm)
  for name, field in (("A", "a"), ("A_LM", "a_lm")):  # where the G-cache keeps them too
    if getattr(gcache, field, None) is not None:
      out[name] = swap(getattr(gcache, field))
  return out


def criticality(params, config, prompts, *, max_new_tokens: int = 256, audit_tokens: int = 64,
                temperature: float = 1.0, top_p: float = 0.8, seed: int = 0, g_lm=None,
                batch_size: int = 16, tol: float = DEFAULT_RANK_TOL,
                keep_tensors: bool = False) -> dict:
  """Both order-parameter variants and the collapse statistics of one model.

  prompts: int [N, P]. Paper variant (`order_parameter`): runs 1 and 2 sample
  max_new_tokens tokens per prompt without any cache (`sample_uncached`, keys
  seed and seed + 1) and take A, A_LM, A_P, G_LM from an uncached forward pass
  over prompt + continuation; the cached run takes them from the G-cache after
  the prompt (`cached_tensors`). Audit variant (`audit_statistics`): two
  sampled audit_tokens-token continuations per prompt (runs 1 and 2 themselves
  when audit_tokens == max_new_tokens, else two more runs, keys seed + 2, + 3),
  compared per (prompt, layer). Collapse (`collapse_statistics`): on the cached
  run's A, A_LM, G_LM, with G_LM after run 1's continuation as the suffixed one.
  Prompts run in batches of batch_size. Returns a JSON-ready dict.
  """
  import time

  import jax
  prompts = np.asarray(prompts, np.int32)
  t0 = time.perf_counter()
  batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]

  def sampled(n_new, seed_):
    parts = []
    for j, b in enumerate(batches):
      key = jax.random.fold_in(jax.random.key(seed_), j)
      toks = sample_uncached(params, config, b, n_new, key, temperature=temperature,
                             top_p=top_p, g_lm=g_lm)
      parts.append(deductive_tensors(params, config, toks, g_lm))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  run1, run2 = sampled(max_new_tokens, seed), sampled(max_new_tokens, seed + 1)
  parts = [cached_tensors(params, config, b, g_lm) for b in batches]
  cached = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  if audit_tokens == max_new_tokens:
    a1, a2 = run1, run2
  else:
    a1, a2 = sampled(audit_tokens, seed + 2), sampled(audit_tokens, seed + 3)
  paper = order_parameter(run1, run2, cached)
  audit = {name: summarize_audit(audit_statistics(a1[name], a2[name]))
           for name in DEDUCTIVE_TENSORS if name in a1}
  collapse = collapse_statistics(cached, tol, interleaved=config.rope_interleaved,
                                 base=config.rope_base, suffixed=run1)
  out = {"settings": {"num_prompts": int(len(prompts)), "prompt_len": int(prompts.shape[1]),
                      "max_new_tokens": max_new_tokens, "audit_tokens": audit_tokens,
                      "temperature": temperature, "top_p": top_p, "seed": seed,
                      "rank_tol": tol, "g_mode": config.g_mode,
                      "rope_interleaved": config.rope_interleaved},
         "paper": paper, "audit": audit, "collapse": collapse,
         "seconds": time.perf_counter() - t0}
  if keep_tensors:
    out["tensors"] = {"run1": run1, "run2": run2, "cached": cached}
  return out


def json_ready(x):
  """x with NumPy scalars/arrays as Python values and inf/nan as strings."""
  if isinstance(x, dict):
    return {k: json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_ready(v) for v in x]
  if isinstance(x, np.ndarray):
    return json_ready(x.tolist())
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return x if math.isfinite(x) else str(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def documents_prompts(path: Path, tokenizer, prompt_len: int, num_prompts: int) -> np.ndarray:
  """Prompts from a .jsonl ('text' per line) or .txt (blank-line separated) file: the
  first prompt_len tokens of each document, then the next windows (as held_out_prompts)."""
  if not path.is_file():
    raise FileNotFoundError(f"--documents file not found: {path}")
  text = path.read_text(encoding="utf-8")
  if path.suffix == ".jsonl":
    try:
      docs = [json.loads(l)["text"] for l in text.splitlines() if l.strip()]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise errors.DataError(f"{path}: every line must be a JSON object with a 'text' field "
                             f"({e})") from None
  else:
    docs = [d for d in text.split("\n\n") if d.strip()]
  return _windows(docs, tokenizer, prompt_len, num_prompts, str(path))


def measure_run(source, *, num_prompts: int = 26, prompt_len: int = 64,
                max_new_tokens: int = 64, audit_tokens: int = 64, temperature: float = 1.0,
                top_p: float = 0.8, seed: int = 0, step: int | None = None,
                batch_size: int = 16, tol: float = DEFAULT_RANK_TOL,
                documents: str | None = None) -> dict:
  """Load a model (`pldr_jax.load`), cut its prompts and run `criticality`."""
  import pldr_jax
  m = pldr_jax.load(str(source), step=step)
  if m.tokenizer is None:
    raise errors.DataError(f"{source} has no tokenizer: pass one beside the weights "
                           "(tokenizer.model)")
  for name, v in (("num_prompts", num_prompts), ("prompt_len", prompt_len),
                  ("max_new_tokens", max_new_tokens), ("audit_tokens", audit_tokens),
                  ("batch_size", batch_size)):
    if v < 1:
      raise errors.ConfigError(f"--{name} must be >= 1, got {v}")
  longest = prompt_len + max(max_new_tokens, audit_tokens)
  if longest > m.config.max_len:
    raise errors.ConfigError(
        f"--prompt_len {prompt_len} plus {max(max_new_tokens, audit_tokens)} new tokens is "
        f"longer than the model's context {m.config.max_len}: shorten them")
  if documents is not None:
    prompts = documents_prompts(Path(documents), m.tokenizer, prompt_len, num_prompts)
    where = str(documents)
  elif m.data is not None:
    prompts = held_out_prompts(m.data, m.tokenizer, prompt_len, num_prompts)
    where = f"{m.data.dataset} [{m.data.eval_split}]"
  else:
    raise errors.ConfigError(f"{source} is not a run with data: give --documents FILE")
  doc = criticality(m.params, m.config, prompts, max_new_tokens=max_new_tokens,
                             audit_tokens=audit_tokens, temperature=temperature, top_p=top_p,
                             seed=seed, g_lm=m.g_lm, batch_size=batch_size, tol=tol)
  doc.update(source=str(source), step=m.step, prompts_from=where)
  return doc
