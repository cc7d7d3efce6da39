"""GB/s of the decode attention's two products over ten K/V buffers [B, 14, T, 64] vs [B, 14, 64, T].

    python benchmarks/results/kv_layout_2026-11-27/products.py T [B]
"""
import sys, time, jax, jax.numpy as jnp, numpy as np
H, T, D = 14, int(sys.argv[1]), 64
BB = int(sys.argv[2]) if len(sys.argv) > 2 else 1
n = 10
Ks = [jax.random.normal(jax.random.key(i), (BB, H, T, D)) for i in range(n)]
KTs = [jnp.swapaxes(k, 2, 3) for k in Ks]
q = jax.random.normal(jax.random.key(99), (BB, H, D))
p = jax.nn.softmax(jax.random.normal(jax.random.key(98), (BB, H, T)), -1)
fs = {
 'qk_htd': (lambda Ks, q: [jnp.einsum('bhtd,bhd->bht', k, q) for k in Ks], Ks, q),
 'qk_hdt': (lambda Ks, q: [jnp.einsum('bhdt,bhd->bht', k, q) for k in Ks], KTs, q),
 'pv_htd': (lambda Vs, p: [jnp.einsum('bht,bhtd->bhd', p, v) for v in Vs], Ks, p),
 'pv_hdt': (lambda Vs, p: [jnp.einsum('bht,bhdt->bhd', p, v) for v in Vs], KTs, p),
}
comp = {k: jax.jit(f) for k, (f, a, b) in fs.items()}
for k, (f, a, b) in fs.items(): jax.block_until_ready(comp[k](a, b))
ts = {k: [] for k in fs}
for r in range(40):
  for k, (f, a, b) in fs.items():
    t = time.perf_counter(); jax.block_until_ready(comp[k](a, b)); ts[k].append(time.perf_counter() - t)
nb = sum(k.nbytes for k in Ks)
for k, t in ts.items(): print('T=%d %-11s %.3f ms  %.1f GB/s' % (T, k, 1e3 * np.median(t[3:]), nb / np.median(t[3:]) / 1e9))
