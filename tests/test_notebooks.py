"""The example notebooks run top to bottom in a real Jupyter kernel (nbclient + ipykernel).

A cell that raises fails the test. The kernel is this interpreter (ipykernel's native
``python3`` spec) with this worktree on PYTHONPATH, started in the repository root.
"""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
# long calls whose progress bar must render as a widget (tqdm's notebook mode) in their own cell
LONG_CALLS = ("federated_fit(", "download_model(", "tqdm(")
WIDGET = "application/vnd.jupyter.widget-view+json"


def test_notebooks_carry_no_outputs():
    assert len(NOTEBOOKS) >= 4
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()   # raises CellExecutionError naming the failing cell
    for cell in nb.cells:
        if cell.cell_type == "code" and any(call in cell.source for call in LONG_CALLS):
            assert any(WIDGET in out.get("data", {}) for out in cell.outputs), \
                f"{path.name}: no progress widget under {cell.source.splitlines()[0]!r}"
