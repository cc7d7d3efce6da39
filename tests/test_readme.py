"""Every ```python block of README.md runs as written, in a fresh interpreter, in a
folder that holds a small trained-run directory at `runs/tiny` (what the main command
leaves there; here a tiny model with the published tokenizer)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 2


_MAKE_RUN = """
import dataclasses, jax
from pldr_jax import checkpoint, config, params
from pldr_jax.data import DataConfig
c = config.tiny(vocab_size=32000, max_len=64)
data = DataConfig(tokenizer_path=%r, vocab_size=32000, seq_len=64)
with checkpoint.Checkpointer("runs/tiny/checkpoints", async_save=False) as ck:
  ck.save(1, params=params.init_params(c, jax.random.key(0)), opt_state={}, data_state={},
          meta={"model": dataclasses.asdict(c), "data": dataclasses.asdict(data)})
"""


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("readme")
  tok = REPO / "data" / "published" / "pldr-refinedweb-32k.model"
  subprocess.run([sys.executable, "-c", _MAKE_RUN % str(tok)], cwd=folder, check=True,
                 capture_output=True, timeout=600)
  return folder


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, run_folder):
  tmp_path = run_folder
  script = tmp_path / f"block_{index}.py"
  script.write_text(BLOCKS[index])
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{proc.stderr[-3000:]}"
