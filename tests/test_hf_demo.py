"""README's main command, `python -m openlora_kernels.demo`, on a tiny configuration."""
import openlora_kernels.demo as demo


def test_demo_runs_and_agrees_with_peft(capsys):
    assert demo.main(["--hidden", "64", "--layers", "2", "--seq", "12", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "OK: every row within" in out and "PEFT mixed batch" in out and "legal" in out
