"""notebooks/quickstart.ipynb runs top to bottom (nbclient), as shipped.

The Hub is simulated: the notebook's own default model id is put, as a tiny model in
the Hugging Face port's layout written by `compat.hf.save_hf`, into a Hugging Face cache
laid out as huggingface_hub leaves it (tests/helpers.write_hf_cache), and the kernel
runs with HF_HOME / HF_HUB_CACHE on it and HF_HUB_OFFLINE=1, so `pldr_jax.load("hf:...")`
goes through the real `snapshot_download`. Two runs, each varying everything at once to
keep CI short: the Hub model (learned G) with Jupyter started in `notebooks/`, and a run
folder moved away from where it was trained (identity G) with Jupyter started in the
repository root.
"""

import re
from pathlib import Path

import pytest

from helpers import write_hf_cache, write_tiny_run

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("huggingface_hub")

pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it
REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
TOKENIZER = REPO / "data" / "published" / "pldr-refinedweb-32k.model"


def _code(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def _default_model(nb) -> str:
  """The Hub id the notebook opens by default (MODEL = "hf:<org>/<model>")."""
  found = re.findall(r'^MODEL = "hf:([^"]+)"', "\n".join(c.source for c in _code(nb)), re.M)
  assert len(found) == 1, "the notebook names its default Hub model in one MODEL = line"
  return found[0]


def test_notebook_is_colab_ready():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  cells = _code(nb)
  assert not any(c.get("outputs") or c.get("execution_count") for c in cells)  # shipped clean
  setup = cells[0].source
  assert re.search(r'^REPO_URL = "', setup, re.M) and "pyproject.toml" in setup  # install cell
  text = "\n".join(c.source for c in cells)
  assert 'matplotlib.use("Agg")' not in text and "plt.show()" in text
  assert re.search(r"^TRAIN = False$", text, re.M)  # trains nothing unless asked
  assert _default_model(nb).startswith("fromthesky/PLDR-LLM-v51-110M")


def _hub_cache(tmp_path, monkeypatch, repo_id, g_mode):
  import jax
  from pldr_jax import config, params
  from pldr_jax.compat import hf
  c = config.tiny(vocab_size=32000, max_len=64, g_mode=g_mode)
  folder = tmp_path / "published"
  hf.save_hf(folder, params.init_params(c, jax.random.key(0)), c, tokenizer=TOKENIZER)
  home = tmp_path / "hf_home"
  snapshot = write_hf_cache(home / "hub", repo_id, folder)
  monkeypatch.setenv("HF_HOME", str(home))
  monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return snapshot


@pytest.mark.parametrize("start,source,g_mode", [("notebooks", "hub", "learned"),
                                                 ("root", "run", "identity")])
def test_quickstart_notebook_runs(tmp_path, monkeypatch, start, source, g_mode):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  if source == "hub":
    snapshot = _hub_cache(tmp_path, monkeypatch, _default_model(nb), g_mode)
    monkeypatch.delenv("PLDR_SOURCE", raising=False)  # the notebook's own default
  else:
    trained = write_tiny_run(tmp_path / "trained" / "tiny", g_mode=g_mode)
    snapshot = trained.rename(tmp_path / "moved")  # a run folder opened after a move
    monkeypatch.setenv("PLDR_SOURCE", str(snapshot))
  out = tmp_path / "out"
  monkeypatch.setenv("PLDR_OUT", str(out))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  cwd = REPO / "notebooks" if start == "notebooks" else REPO
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(cwd)}})
  client.execute()
  outputs = [o for c in _code(nb) for o in c.get("outputs", [])]
  text = "\n".join(o.get("text", "") for o in outputs)
  assert f"pldr-jax checkout: {REPO}" in text  # found the checkout: nothing installed
  assert f"from {snapshot}" in text  # the Hub model came out of the HF cache's snapshot
  assert "JAX runs on cpu" in text
  assert "g_cache=True:" in text and "g_cache=False:" in text
  assert "sparse H2O:" in text and "LESS:" in text  # generate with a LESS cache
  assert "SparseState" in text and "bytes of decode state" in text
  assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot, inline
  assert (out / "g_lm_spectra.png").stat().st_size > 5000  # its copy under PLDR_OUT
  assert not (cwd / "g_lm_spectra.png").exists()
