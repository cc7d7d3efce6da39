"""notebooks/quickstart.ipynb runs top to bottom (nbclient) on a tiny run directory."""

import os
from pathlib import Path

import pytest

from helpers import write_tiny_run

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("g_mode", ["learned", "identity"])
def test_quickstart_notebook_runs(tmp_path, monkeypatch, g_mode):
  run = write_tiny_run(tmp_path / "run", g_mode=g_mode)
  nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # shipped clean
  monkeypatch.setenv("PLDR_SOURCE", str(run))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
  assert "g_cache=True:" in text and "g_cache=False:" in text
  assert "sparse H2O:" in text and "LESS:" in text  # generate with a LESS cache
  assert "SparseState" in text and "bytes of decode state" in text
  assert (run / "g_lm_spectra.png").stat().st_size > 5000  # in the run folder, not the cwd
  assert not (tmp_path / "g_lm_spectra.png").exists()
