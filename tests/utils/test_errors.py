"""The project's errors (safety_units.utils.errors): an entry point prints one paragraph, no traceback."""


def test_entry_point_prints_one_paragraph_error(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, str(ROOT / "train.py"), "model=hf", "model.path=/no/such/model",
           f"hydra.run.dir={tmp_path}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "error: model.path='/no/such/model' does not exist" in res.stderr
    assert "Traceback" not in res.stderr
