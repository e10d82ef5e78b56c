"""The docs stay true: docstring examples run, README's Python runs, .ci/run calls README's test command."""
import doctest
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCTEST_MODULES = ["openlora_kernels.metadata", "openlora_kernels.ops.api", "openlora_kernels.ops.backends",
                   "openlora_kernels.ops.cpu_ext"]


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples_run(name):
    res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", _read("README.md"), flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    m = re.search(r"# tests\n(.+)\n", readme)
    assert m, "README.md must show the test command under '# tests'"
    assert m.group(1).strip() in _read(".ci/run")
