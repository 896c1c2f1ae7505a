"""The notebooks in ``notebooks/`` run top to bottom without a cell error.

Each notebook is executed with nbclient in a fresh IPython kernel of this very
interpreter (a kernel spec written to a temporary ``JUPYTER_PATH``, so a ``python3``
kernel installed elsewhere on the machine cannot pick another environment), with the
notebooks' quick settings. The committed notebooks must carry no outputs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "pyro-sgmcmc-tests"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory) -> dict[str, str]:
    """Environment whose ``JUPYTER_PATH`` holds a kernel spec for ``sys.executable``."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pyro-sgmcmc tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    jupyter_path = os.pathsep.join([str(root), *filter(None, [os.environ.get("JUPYTER_PATH")])])
    return {
        **os.environ,
        "JUPYTER_PATH": jupyter_path,
        "PYRO_SGMCMC_QUICK": "1",
        # The notebooks' models are small: one thread is as fast, and it does not
        # collapse when other processes compete for the cores (OpenMP spin-waits).
        "OMP_NUM_THREADS": "1",
    }


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_saved_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} carry outputs or execution counts; clear them "
        "before committing (jupyter nbconvert --clear-output --inplace)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path: Path, kernel_env: dict[str, str], monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", kernel_env["JUPYTER_PATH"])  # to find the spec
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=600,  # per cell: a hang fails instead of stalling CI
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute(env=kernel_env)
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}", pytrace=False)
