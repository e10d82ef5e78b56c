"""What `pip install` builds: the CUDA extension only when asked (OPENLORA_CUDA_ARCHS) or when a GPU
is visible, never with OPENLORA_SKIP_CUDA; what is built and what is skipped is said, with why."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from openlora_kernels.ops import cuda_build

ROOT = Path(__file__).resolve().parent.parent


def _fake_tool(tmp_path, name, body):
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("OPENLORA_SKIP_CUDA", "OPENLORA_CUDA_ARCHS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setattr(cuda_build, "missing_tools_reason", lambda: None)   # nvcc + pybind11 "present"
    return monkeypatch


def test_visible_gpu_archs_read_from_nvidia_smi(clean_env, tmp_path):
    _fake_tool(tmp_path, "nvidia-smi", 'echo "9.0"; echo "8.6"; echo "9.0"')
    assert cuda_build.visible_gpu_archs() == [86, 90]
    assert cuda_build.install_plan() == ([86, 90], "a GPU is visible (sm_86, sm_90)")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "")          # hides every GPU, as CUDA would
    assert cuda_build.visible_gpu_archs() == []


def test_no_gpu_means_no_cuda_build_unless_asked(clean_env, tmp_path):
    _fake_tool(tmp_path, "nvidia-smi", 'echo "No devices were found"; exit 6')
    clean_env.setattr(cuda_build, "NVIDIA_PROC_GPUS", str(tmp_path / "no-such-proc-dir"))
    assert cuda_build.visible_gpu_archs() == []
    archs, why = cuda_build.install_plan()
    assert archs is None and "no GPU is visible" in why and "OPENLORA_CUDA_ARCHS" in why
    assert cuda_build.install_skip_reason() == why
    clean_env.setenv("OPENLORA_CUDA_ARCHS", "90;8.0")
    assert cuda_build.install_plan() == ([80, 90], "OPENLORA_CUDA_ARCHS=90;8.0")
    assert cuda_build.install_skip_reason() is None
    clean_env.setenv("OPENLORA_SKIP_CUDA", "1")           # wins over everything (.ci/run uses it)
    assert cuda_build.install_plan() == (None, "OPENLORA_SKIP_CUDA is set")
    clean_env.delenv("OPENLORA_SKIP_CUDA")
    clean_env.setenv("OPENLORA_CUDA_ARCHS", "hopper")
    with pytest.raises(ValueError, match="OPENLORA_CUDA_ARCHS"):
        cuda_build.install_plan()


def test_old_or_unreadable_gpus(clean_env, tmp_path):
    _fake_tool(tmp_path, "nvidia-smi", 'echo "7.5"')
    archs, why = cuda_build.install_plan()
    assert archs is None and "sm_75" in why and "older than sm_80" in why
    _fake_tool(tmp_path, "nvidia-smi", 'echo "garbled"')   # a driver is there, its answer unreadable
    proc = tmp_path / "proc"
    (proc / "0000:01:00.0").mkdir(parents=True)
    clean_env.setattr(cuda_build, "NVIDIA_PROC_GPUS", str(proc))
    assert cuda_build.visible_gpu_archs() is None
    assert cuda_build.install_plan()[0] == list(cuda_build.DEFAULT_ARCHS)


def test_missing_tools_are_named_with_what_wanted_the_build(clean_env):
    clean_env.setenv("OPENLORA_CUDA_ARCHS", "90")
    clean_env.setattr(cuda_build, "missing_tools_reason", lambda: "nvcc was not found (set CUDA_HOME)")
    archs, why = cuda_build.install_plan()
    assert archs is None and why == "nvcc was not found (set CUDA_HOME); wanted because OPENLORA_CUDA_ARCHS=90"


def _setup_copy(tmp_path):
    """setup.py with what it reads (pyproject, README, the package, csrc/) in a scratch folder."""
    dst = tmp_path / "src"
    dst.mkdir()
    for f in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, dst / f)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "_csrc")
    shutil.copytree(ROOT / "openlora_kernels", dst / "openlora_kernels", ignore=ignore)
    shutil.copytree(ROOT / "csrc", dst / "csrc", ignore=ignore)
    return dst


def _build_ext(src, tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OPENLORA_", "CUDA_VISIBLE"))}
    full.update(PATH=str(tmp_path / "bin") + os.pathsep + os.environ.get("PATH", ""), **env)
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=full,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          start_new_session=True)   # no controlling terminal: the lines go to stdout
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_setup_says_what_it_skips_and_why(tmp_path):
    src = _setup_copy(tmp_path)
    _fake_tool(tmp_path, "nvidia-smi", "exit 9")         # a machine without a GPU, nvcc or not
    out = _build_ext(src, tmp_path, OPENLORA_SKIP_CPU_EXT="1", CUDA_VISIBLE_DEVICES="")
    assert "openlora_kernels: not building the native CPU extension: OPENLORA_SKIP_CPU_EXT is set" in out
    assert "openlora_kernels: not building the CUDA extension: no GPU is visible" in out
    assert out.count("not building the CUDA extension") == 1
    out = _build_ext(src, tmp_path, OPENLORA_SKIP_CPU_EXT="1", OPENLORA_SKIP_CUDA="1")
    assert "openlora_kernels: not building the CUDA extension: OPENLORA_SKIP_CUDA is set" in out
    assert not list(src.glob("openlora_kernels/ops/_cuda_sgmv*"))


def test_setup_reuses_an_up_to_date_cpu_module_and_rebuilds_a_stale_one(tmp_path):
    built = sorted((ROOT / "openlora_kernels" / "ops").glob("_cpu_sgmv*.so"))
    if not built:
        pytest.skip("the native CPU extension is not built in this checkout")
    src = _setup_copy(tmp_path)
    module = src / "openlora_kernels" / "ops" / built[0].name
    shutil.copy2(built[0], module)
    os.utime(module)                                       # newer than every source
    out = _build_ext(src, tmp_path, OPENLORA_SKIP_CUDA="1", CC="false", CXX="false")
    assert "the native CPU extension is up to date" in out and "compiling the native CPU" not in out
    later = module.stat().st_mtime + 10
    os.utime(src / "csrc" / "cpu" / "sgmv_cpu.h", (later, later))   # a header changed: recompile
    out = _build_ext(src, tmp_path, OPENLORA_SKIP_CUDA="1", CC="false", CXX="false")   # a compiler that fails
    assert "compiling the native CPU extension" in out and "was not built" in out
