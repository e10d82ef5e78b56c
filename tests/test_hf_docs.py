"""docs/usage.md stays true: its Python blocks run as written."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_usage_python_blocks_run():
    with open(os.path.join(ROOT, "docs", "usage.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 2
    env = {}
    for code in blocks:           # later blocks reuse the names of earlier ones
        exec(compile(code, "docs/usage.md", "exec"), env)
    assert env["lm"].adapters == ("legal",) and env["y"].shape == (6, 64)


def test_training_python_blocks_run(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks
    env = {}
    for code in blocks:
        exec(compile(code.replace("/tmp/alice", str(tmp_path / "alice")), "docs/training.md", "exec"), env)
    assert sorted(os.listdir(tmp_path / "alice")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(p.grad is not None for p in env["params"])
