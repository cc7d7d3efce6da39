"""Child of tests/test_multidevice.py: restore a run's newest checkpoint sharded over
all devices of all processes and print `STEP <step> DIGEST <sha256>` of the parameters
(gathered on every process).

argv: checkpoint folder, coordinator address ("" for one process), number of processes,
this process's index.
"""

import argparse, hashlib, sys
import jax, numpy as np
from pldr_jax.training import distributed, train
from pldr_jax.training.checkpoint import Checkpointer, load_meta
from pldr_jax.config import PLDRConfig, TrainConfig
ckdir, address, n, i = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
distributed.initialize(argparse.Namespace(coordinator_address=address, num_processes=n,
                                          process_id=i))
assert jax.process_count() == n
meta = load_meta(ckdir)
config, tc = PLDRConfig(**meta["model"]), TrainConfig(**meta["train"])
mesh = train.make_mesh(tc)
tx = train.make_optimizer(tc)
abstract = train.abstract_train_state(config, tx, mesh)
with Checkpointer(ckdir) as c:
  r = c.restore(abstract_params=abstract["params"], abstract_opt_state=abstract["opt_state"])
if n > 1:
  from jax.experimental import multihost_utils
  host = multihost_utils.process_allgather(r["params"], tiled=True)
else:
  host = jax.device_get(r["params"])
h = hashlib.sha256()
for x in jax.tree.leaves(host):
  h.update(np.ascontiguousarray(x).tobytes())
print("STEP", r["step"], "DIGEST", h.hexdigest())
