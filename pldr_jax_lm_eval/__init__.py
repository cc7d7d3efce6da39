"""The lm-evaluation-harness integration of pldr-jax, kept outside the core package.

Needs the `eval` extra (`pip install -e '.[eval]'`). Importing this package
registers the model `pldr-jax` with lm-eval; see `pldr_jax_lm_eval.model`.
"""

from pldr_jax_lm_eval.model import PLDRJaxLM

__all__ = ["PLDRJaxLM"]
