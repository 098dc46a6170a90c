"""Every notebook executes without error (nbclient, small settings through the environment;
each notebook asserts its own numbers: the mixture formula, deferred == dense, the cache
after a flush, the imported Llama against a NumPy forward), and none is committed with
outputs."""

import json
import pathlib

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def test_the_five_notebooks_are_there_without_outputs():
    assert NAMES == ["01_model_tour.ipynb", "02_train_tiny.ipynb", "03_deferred_decoding.ipynb",
                     "04_evaluate_checkpoint.ipynb", "05_upcycle_llama.ipynb"]
    for name in NAMES:
        nb = json.loads((NOTEBOOKS / name).read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name} has outputs"


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    """Small settings, runs in a temporary dir, one CPU device, no network."""
    runs = tmp_path_factory.mktemp("notebook_runs")
    return {"NVIUM_NB_RUNS": str(runs), "NVIUM_NB_STEPS": "10", "NVIUM_NB_TOKENS": "16",
            "NVIUM_NB_ROUTER_STEPS": "12", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)  # in order: 04 evaluates the run 02 trained
def test_notebook_runs(name, notebook_env, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    for key, value in notebook_env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
