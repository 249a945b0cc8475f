"""The teaching notebooks (`notebooks/*.ipynb`) run headless from top to bottom without a cell error, and are
stored with their outputs stripped.

Each notebook asserts the facts it teaches, so a change that breaks one of them fails here.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def _unstripped_cells(notebook: dict) -> list[str]:
    """Descriptions of the code cells that carry outputs or an execution count."""
    bad = []
    for i, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            bad.append(f"cell {i} has {len(cell['outputs'])} output(s)")
        if cell.get("execution_count") is not None:
            bad.append(f"cell {i} has execution_count {cell['execution_count']}")
    return bad


def _git_versions(path: Path) -> dict[str, str]:
    """The notebook's JSON as committed (HEAD) and as staged (index), for whichever exist."""
    rel = path.relative_to(ROOT).as_posix()
    out = {}
    for label, spec in (("HEAD", f"HEAD:{rel}"), ("index", f":{rel}")):
        try:
            proc = subprocess.run(["git", "show", spec], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return out
        if proc.returncode == 0:
            out[label] = proc.stdout
    return out


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks under {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_outputs_stripped(path: Path):
    """Working tree, index and HEAD copies hold no outputs and no execution counts."""
    versions = {"working tree": path.read_text(encoding="utf-8"), **_git_versions(path)}
    for label, text in versions.items():
        notebook = json.loads(text)
        assert notebook.get("nbformat") == 4, f"{path.name} ({label}): not an nbformat v4 notebook"
        bad = _unstripped_cells(notebook)
        assert not bad, f"{path.name} ({label}) is not stripped: " + "; ".join(bad)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path: Path):
    """Execute every cell in a fresh python3 kernel with cwd = notebooks/; any cell error fails the test."""
    nbformat = importlib.import_module("nbformat")
    nbclient = importlib.import_module("nbclient")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name}: a cell failed\n{err}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
