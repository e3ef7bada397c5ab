"""The notebook runs top to bottom on the bundled model and teaches it the fact."""

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient

NOTEBOOK = ROOT / "LLM Fine Tuning Workflow.ipynb"


def test_notebook_is_committed_without_outputs_and_defaults_to_the_3b_model():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert 'model="Qwen/Qwen2.5-3B-Instruct"' in code[0].source
    assert "import fine_tune" in code[0].source
    assert not any("def " in cell.source for cell in code), "the notebook calls fine_tune.py, it does not copy it"


@pytest.mark.slow
def test_notebook_teaches_the_bundled_model(subset, smollm2_dir, tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    settings = next(cell for cell in notebook.cells if cell.cell_type == "code")
    settings.source += (
        f'\nsettings = fine_tune.default_settings(model="smollm2", data=r"{subset}", eval_questions="none", '
        f'replay=False, output=r"{tmp_path / "adapter"}", epochs=4, lr=2e-3, batch_size=4)\n'
    )
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    last_output = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    after = last_output.split("After:", 1)[1]
    assert "wizard" in after.lower()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
