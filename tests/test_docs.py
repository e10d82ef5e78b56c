"""The docs stay true: docstring examples run; every ```python block of README.md and docs/*.md runs
as written, on its own (a fresh namespace, in a scratch working directory), and what it shows is
checked where it shows something checkable; .ci/run calls README's test command.

A block that cannot run here (it needs a GPU or the network) says so on its first line,
``# not run in the tests: <reason>``, visible to readers, and is skipped with that reason.
"""
import contextlib
import doctest
import importlib
import io
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCTEST_MODULES = ["openlora_kernels.metadata", "openlora_kernels.ops.api", "openlora_kernels.ops.backends",
                   "openlora_kernels.ops.cpu_ext", "openlora_kernels.ops.fp8"]
DOC_FILES = ["README.md"] + sorted(f"docs/{f}" for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
NOT_RUN = "# not run in the tests:"
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", flags=re.S | re.M)


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def fenced_blocks(text):
    """(language, first line number of the code, code) of each fenced block."""
    return [(m.group(1), text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text)]


PY_BLOCKS = [(rel, line, code) for rel in DOC_FILES for lang, line, code in fenced_blocks(_read(rel))
             if lang == "python"]


# ------------------------------------------------------------- what each block shows, checked


def _check_readme_kernels(env, out):
    """The kernel snippet prints its error against the float64 reference it computes; recompute the
    reference independently (tests/lora_reference.py) and check both."""
    from lora_reference import Problem, reference_delta

    m = re.fullmatch(r"max \|y - reference\| = (\S+) for \|y\| up to (\d+)\n", out)
    assert m, out
    ref = reference_delta(Problem(env["x"], torch.zeros_like(env["y"]), [env["A"]], [env["B"]], env["indices"],
                                  env["scalings"], env["ranks"]))
    assert float(m.group(1)) == pytest.approx(float((env["y"].double() - ref).abs().max()), rel=0.06)
    assert float(m.group(1)) < 1e-4 and int(m.group(2)) > 10
    assert torch.allclose(env["ref"], ref)
    assert torch.all(env["y"][[1, 2, 7]] == 0)              # rank 0 and -1 rows: nothing added


def _check_usage_example(env, out):
    assert env["lm"].adapters == ("legal",)                   # "medical" was unloaded last
    assert "('medical', 'legal')" in out and "torch.Size([3, 5, 128]) torch.Size([3, 9])" in out


def _check_usage_serving_stacks(env, out):
    x, y, lin = env["x"], env["y"], env["mlp"][0]
    base = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert y.shape == (6, 64)
    assert torch.equal(y[3:], base[3:])                       # slot -1: the base model, bit for bit
    assert (y[:3] - base[:3]).abs().min() > 0                 # the adapter's rows changed everywhere


def _check_training(env, out):
    assert sorted(os.listdir("alice_adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(p.grad is not None for p in env["params"])
    assert out.strip() == str(sorted(env["lm"].adapter_parameters("alice"))[:2])


CHECKS = {  # (file, index of the python block in it): check(namespace, printed text)
    ("README.md", 0): _check_readme_kernels,
    ("docs/usage.md", 0): _check_usage_example,
    ("docs/usage.md", 1): _check_usage_serving_stacks,
    ("docs/training.md", 0): _check_training,
}


def _index(rel, line):
    return [ln for r, ln, _ in PY_BLOCKS if r == rel].index(line)


@pytest.mark.parametrize("rel,line,code", PY_BLOCKS, ids=[f"{r}:{ln}" for r, ln, _ in PY_BLOCKS])
def test_doc_python_block_runs_on_its_own(rel, line, code, tmp_path, monkeypatch):
    first = code.splitlines()[0] if code.strip() else ""
    if first.startswith(NOT_RUN):
        pytest.skip(first[len(NOT_RUN):].strip())
    monkeypatch.chdir(tmp_path)
    env, out = {"__name__": "__doc__"}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile("\n" * (line - 1) + code, os.path.join(ROOT, rel), "exec"), env)
    check = CHECKS.get((rel, _index(rel, line)))
    if check is not None:
        check(env, out.getvalue())


def test_every_doc_snippet_is_collected():
    """Python hides under no other fence name, the blocks with checks exist, the skipped ones are few."""
    langs = {lang for rel in DOC_FILES for lang, _, _ in fenced_blocks(_read(rel))}
    assert langs <= {"python", "bash", "text", ""}, langs
    assert len(PY_BLOCKS) >= 4
    for rel, idx in CHECKS:
        assert idx < sum(1 for r, _, _ in PY_BLOCKS if r == rel), f"{rel} has no python block #{idx}"
    assert sum(code.startswith(NOT_RUN) for _, _, code in PY_BLOCKS) <= 2
    untagged = [(rel, ln) for rel in DOC_FILES for lang, ln, code in fenced_blocks(_read(rel))
                if lang == "" and re.search(r"^(import |from \S+ import )", code, flags=re.M)]
    assert not untagged, f"Python in an untagged fence (tag it python or text): {untagged}"


def test_fence_parser_finds_blocks_and_lines():
    text = "a\n```python\nx = 1\n```\nb\n```bash\nls\n```\n```\nplain\n```\n"
    assert fenced_blocks(text) == [("python", 3, "x = 1\n"), ("bash", 7, "ls\n"), ("", 10, "plain\n")]


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples_run(name):
    res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    m = re.search(r"# tests\n(.+)\n", readme)
    assert m, "README.md must show the test command under '# tests'"
    assert m.group(1).strip() in _read(".ci/run")
