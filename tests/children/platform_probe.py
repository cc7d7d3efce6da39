"""Child of tests/test_distributed_platform.py: what a user's entry point meets on a plain
machine: jax imported (and, with the tpu extra, libtpu) before the launch is resolved.
Prints TPU_SKIP_MDS_QUERY as `import jax` left it and the resolved launch mode. No
arguments.
"""

import os

import jax  # noqa: F401  (imported first, as an entry point does)

from pldr_jax.training import distributed

print(os.environ.get("TPU_SKIP_MDS_QUERY"), distributed.resolve().mode)
