"""Child of tests/test_host.py: host.retain_freed_memory against page faults.

A training-like loop: a jitted step with a donated state and 256 MiB of temporaries,
called 10 times; prints one JSON line with whether the setting was applied and the page
faults of the last 3 calls, in MiB. A short pause after each call stands for a training
loop's own work between steps. The product has a short inner dimension (64): the
temporaries are as large, the arithmetic is cheap. No arguments (PLDR_JAX_SYSTEM_MALLOC
in the environment chooses).
"""

import functools, json, resource, time
from pldr_jax.training import host
applied = host.retain_freed_memory()
import jax, jax.numpy as jnp

@functools.partial(jax.jit, donate_argnums=0)
def step(s, w):
  t = jnp.tanh(s @ w)        # [8192, 4096]: 128 MiB
  u = jnp.cumsum(t, axis=0)  # and 128 MiB more
  return s + u[:, :s.shape[1]].sum() * 1e-9

s, w = jnp.ones((8192, 64)), jnp.ones((64, 4096)) * 1e-3
faults = []
for i in range(10):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  s = step(s, w); s.block_until_ready()
  time.sleep(0.05)  # PJRT frees the temporaries just after the output is ready
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"applied": applied,
                  "mib": sum(faults[-3:]) * resource.getpagesize() / 2 ** 20}))
