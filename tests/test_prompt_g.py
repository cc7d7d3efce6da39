"""experiments/perplexity.py --g_prompt: scoring with G_LM fixed from a prompt is
teacher-forced decoding with the KV- and G-cache, computed in one forward."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import perturbed_params, random_tokens, load_script
from pldr_jax import config as cfg
from pldr_jax.inference import decode

pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it

REPO = Path(__file__).resolve().parents[1]


ppl = load_script("experiments/perplexity.py")


def _decode_nll(params, c, tokens, lengths, prompt_len):
  """Plain loop: prefill the prompt, then feed the true tokens one at a time."""
  logits, state, gcache = decode.prefill(params, tokens[:, :prompt_len],
                                         jnp.full((tokens.shape[0],), prompt_len, jnp.int32),
                                         config=c, cache_len=tokens.shape[1])
  per_pos = [logits[:, prompt_len - 1]]
  for t in range(prompt_len, tokens.shape[1] - 1):
    lg, state = decode.decode_step(params, gcache, state, tokens[:, t], config=c)
    per_pos.append(lg)
  tot = cnt = 0.0
  for i, lg in enumerate(per_pos):  # lg predicts the token at index prompt_len + i
    j = prompt_len + i
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(lg, jnp.float64), axis=-1))
    for b in range(tokens.shape[0]):
      if j < lengths[b]:
        tot -= lp[b, int(tokens[b, j])]
        cnt += 1
  return tot, cnt


@pytest.mark.x64
@pytest.mark.parametrize("causal", [False, True])
def test_prompt_g_equals_teacher_forced_cached_decode(causal):
  c = cfg.tiny(param_dtype="float64", compute_dtype="float64", causal_metric=causal)
  p = perturbed_params(c, seed=3)
  tokens = np.array(random_tokens(c, (2, 12), seed=5))
  lengths = [12, 9]
  tokens[1, 9:] = 0
  mask = (np.arange(12)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  t, m = jnp.asarray(tokens), jnp.asarray(mask)
  prompt = 4
  g = decode.prompt_g(p, t, m, prompt, config=c)
  s_prompt, n = ppl._nll_after(p, t, m, g, prompt, config=c)
  want, want_n = _decode_nll(p, c, t, lengths, prompt)
  assert float(n) == want_n == (12 - prompt) + (9 - prompt)
  np.testing.assert_allclose(float(s_prompt), want, rtol=1e-10)
  # Whole-sequence A differs: later queries enter A (non-causal), or G moves
  # with each position (causal metric) instead of staying at the prompt's.
  s_whole, _ = ppl._nll_after(p, t, m, None, prompt, config=c)
  assert abs(float(s_whole) - want) > 1e-6 * abs(want)
  rows = ppl.prompt_g_eval(p, c, [{"tokens": tokens, "mask": mask}], [prompt])
  assert rows[0]["prompt_loss"] == pytest.approx(want / want_n, rel=1e-10)
  assert rows[0]["whole_loss"] == pytest.approx(float(s_whole) / want_n, rel=1e-10)
