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
