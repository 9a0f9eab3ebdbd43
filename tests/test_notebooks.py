"""Every Colab notebook runs top to bottom on CPU with small sizes, and matches its .py source."""
import glob
import os

import jupytext
import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))


def _code(nb) -> list[str]:
  return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_matches_its_paired_source(path):
  source = path[:-len(".ipynb")] + ".py"
  assert os.path.exists(source), f"{path} has no paired jupytext source {source}"
  assert _code(nbformat.read(path, as_version=4)) == _code(jupytext.read(source)), (
      f"{path} is out of date: run `jupytext --to ipynb {source}`")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("QJAX_SMALL", "1")       # the notebooks shrink their sizes for CI
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.chdir(tmp_path)
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
