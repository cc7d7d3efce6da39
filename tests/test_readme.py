"""Every ```python block of README.md runs as written, in a fresh interpreter, in a
folder that holds a small trained-run directory at `runs/tiny` (what the main command
leaves there; here a tiny model with the published tokenizer)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_tiny_run

pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it

REPO = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 2


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("readme")
  write_tiny_run(folder / "runs" / "tiny")
  return folder


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, run_folder):
  tmp_path = run_folder
  script = tmp_path / f"block_{index}.py"
  script.write_text(BLOCKS[index])
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{proc.stderr[-3000:]}"
