"""Building the CUDA extension (csrc/ -> ``_cuda_sgmv``): at install time and on first use.

Standard library only: ``setup.py`` loads this file by path inside an isolated build
environment where torch is absent. Nothing here touches a GPU.

Two ways the binary comes to exist (docs/cuda.md):

* **install time** -- ``setup.py`` builds ``openlora_kernels/ops/_cuda_sgmv*.so`` when asked
  (``OPENLORA_CUDA_ARCHS`` set) or when a GPU is visible (for that GPU's arch), and nvcc is
  found, with CMake + Ninja when both are installed, else with nvcc directly (same flags); on a
  machine without a GPU nothing is compiled unless asked (:func:`install_plan` says why);
* **first use** -- when the installed package lacks a binary usable on this GPU (built on a CPU
  box, a stale binary, another arch), :func:`load_or_build` compiles the shipped sources for this
  GPU's arch into a per-user cache, ``<cache>/<source hash>-sm<arch>/``, under a file lock so
  two processes never build the same entry at once; a failure is recorded there and reported.

Environment:
  OPENLORA_CUDA_ARCHS   build at install time for these archs, e.g. "80;89;90", "90", "8.0,9.0"
                        (unset: only when a GPU is visible, for its arch)
  OPENLORA_SKIP_CUDA=1  do not build the extension at install time, even with a GPU
  OPENLORA_CUDA_REQUIRED=1  make an install-time build failure fatal (default: warn, continue)
  OPENLORA_CUDA_BUILDER  "cmake" or "nvcc" to force one install-time build route
  OPENLORA_CUDA_JIT=0   never build on first use
  OPENLORA_CACHE_DIR    cache root (default $XDG_CACHE_HOME/openlora_kernels or ~/.cache/...)
  OPENLORA_CSRC_DIR     where the CUDA sources are (default: shipped copy, else the checkout)
  OPENLORA_CUDA_REBUILD=1  ignore a recorded first-use build failure and try again
  OPENLORA_PTXAS_VERBOSE=1 pass -Xptxas -v (register / spill report in the build log)
  CUDA_HOME / CUDA_PATH  where nvcc lives (else PATH, else /usr/local/cuda)
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

MODULE_NAME = "_cuda_sgmv"
PACKAGE_MODULE = "openlora_kernels.ops." + MODULE_NAME
DEFAULT_ARCHS = (80, 89, 90)
MIN_ARCH = 80  # mma.sync m16n8k16 with bf16, cp.async, ldmatrix
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")
TRANSLATION_UNITS = ("launchers.cu", "bindings.cpp")
LOCK_TIMEOUT_S = 1800.0
FAILED_MARKER = "BUILD_FAILED"
NVIDIA_PROC_GPUS = "/proc/driver/nvidia/gpus"   # one entry per GPU the driver sees

_PKG_OPS_DIR = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------ sources


def source_dir() -> Optional[Path]:
    """The CUDA sources: $OPENLORA_CSRC_DIR, the copy shipped in the package (wheels), or the
    checkout's csrc/ (editable installs, source trees). None when none is there."""
    env = os.environ.get("OPENLORA_CSRC_DIR")
    candidates = [Path(env)] if env else []
    candidates += [_PKG_OPS_DIR / "_csrc", _PKG_OPS_DIR.parent.parent / "csrc"]
    for c in candidates:
        if (c / "launchers.cu").is_file() and (c / "include" / "openlora").is_dir():
            return c
    return None


def source_files(src: Path) -> List[Path]:
    """The CUDA binding's sources under csrc/ (csrc/cpu/, the native CPU backend's, is not compiled
    into it: a change there does not make the binding stale)."""
    return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES
                  and p.relative_to(src).parts[0] != "cpu")


def source_hash(src: Path) -> str:
    """16 hex digits of SHA-256 over the sources' relative paths and contents."""
    h = hashlib.sha256()
    for p in source_files(src):
        h.update(p.relative_to(src).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# -------------------------------------------------------------------------------- archs


def parse_archs(spec: str) -> List[int]:
    """'80;89;90', '8.0 9.0', 'sm_90,sm_80' -> [80, 89, 90] (sorted, unique). Raises ValueError."""
    out = set()
    for tok in spec.replace(",", ";").replace(" ", ";").split(";"):
        tok = tok.strip().lower()
        if not tok:
            continue
        for prefix in ("sm_", "compute_"):
            if tok.startswith(prefix):
                tok = tok[len(prefix):]
        tok = tok.rstrip("a")  # 90a: the plain target is what these kernels need
        try:
            arch = int(round(float(tok) * 10)) if "." in tok else int(tok)
        except ValueError:
            raise ValueError(f"OPENLORA_CUDA_ARCHS: cannot read {tok!r} as a compute capability") from None
        if arch < MIN_ARCH:
            raise ValueError(f"OPENLORA_CUDA_ARCHS: sm_{arch} is below sm_{MIN_ARCH}, the oldest GPU these kernels support")
        out.add(arch)
    if not out:
        raise ValueError(f"OPENLORA_CUDA_ARCHS: no arch in {spec!r}")
    return sorted(out)


def install_archs() -> List[int]:
    """The archs of OPENLORA_CUDA_ARCHS, else the default ones (a build asked for no arch)."""
    spec = os.environ.get("OPENLORA_CUDA_ARCHS", "")
    return parse_archs(spec) if spec.strip() else list(DEFAULT_ARCHS)


def gencode_flags(archs: Sequence[int]) -> List[str]:
    """Machine code for every arch, plus PTX of the newest so later GPUs can JIT it."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    top = max(archs)
    flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    return flags


def arch_supported(arch: int, sass: Sequence[int], ptx: Sequence[int]) -> bool:
    """Whether a binary with SASS for ``sass`` and PTX for ``ptx`` runs on compute capability
    ``arch``: SASS of the same major version and an equal or lower minor, or any older PTX."""
    if any(s // 10 == arch // 10 and s <= arch for s in sass):
        return True
    return any(p <= arch for p in ptx)


# ------------------------------------------------------------------------------- tools


def find_nvcc() -> Optional[str]:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.access(default, os.X_OK) else None


def pybind11_include() -> Optional[str]:
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11.get_include()


def pybind11_cmake_dir() -> Optional[str]:
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11.get_cmake_dir()


def _tool(module: str, exe: str) -> Optional[str]:
    """A build tool from its pip package (cmake, ninja) or PATH."""
    with contextlib.suppress(Exception):
        mod = __import__(module)
        d = getattr(mod, "BIN_DIR", None)
        if d and os.access(os.path.join(d, exe), os.X_OK):
            return os.path.join(d, exe)
    return shutil.which(exe)


def missing_tools_reason() -> Optional[str]:
    """Why the extension cannot be compiled here (None: nvcc and pybind11 are present)."""
    if find_nvcc() is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if pybind11_include() is None:
        return "pybind11 is not installed (pip install pybind11)"
    if source_dir() is None:
        return "the CUDA sources (csrc/) are not present in this install"
    return None


def visible_gpu_archs(timeout: float = 20.0) -> Optional[List[int]]:
    """Compute capabilities of the NVIDIA GPUs visible here (e.g. [90]), read without CUDA or torch
    (``nvidia-smi``, else the driver's /proc entries): [] when none is visible, None when one is
    but its arch could not be read. ``CUDA_VISIBLE_DEVICES`` set to "" or "-1" hides them all."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            proc = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            proc = None
        if proc is not None and proc.returncode == 0:
            archs = set()
            for line in proc.stdout.splitlines():
                with contextlib.suppress(ValueError):
                    archs.add(int(round(float(line.strip()) * 10)))
            if archs:
                return sorted(archs)
    gpus = Path(NVIDIA_PROC_GPUS)
    with contextlib.suppress(OSError):
        if gpus.is_dir() and any(gpus.iterdir()):
            return None
    return []


def install_plan() -> Tuple[Optional[List[int]], str]:
    """What ``pip install`` does with the CUDA extension: (archs to build, why) or (None, why not).

    Built when asked (``OPENLORA_CUDA_ARCHS``) or when a GPU is visible (for the visible GPUs'
    archs; the default archs when those cannot be read), and nvcc and pybind11 are there; never
    with ``OPENLORA_SKIP_CUDA=1``. Without a GPU it is left to the first use on a GPU machine
    (:func:`load_or_build`), which builds for that GPU only. Raises ValueError for an unreadable
    ``OPENLORA_CUDA_ARCHS``."""
    if os.environ.get("OPENLORA_SKIP_CUDA", "0").lower() in ("1", "true", "yes", "on"):
        return None, "OPENLORA_SKIP_CUDA is set"
    spec = os.environ.get("OPENLORA_CUDA_ARCHS", "")
    if spec.strip():
        archs, why = parse_archs(spec), f"OPENLORA_CUDA_ARCHS={spec.strip()}"
    else:
        seen = visible_gpu_archs()
        if seen == []:
            return None, ("no GPU is visible and OPENLORA_CUDA_ARCHS is not set (backend 'cuda' builds for "
                          "its GPU on first use; OPENLORA_CUDA_ARCHS=90 builds sm_90 now)")
        if seen is None:
            archs, why = list(DEFAULT_ARCHS), "a GPU is visible (its arch could not be read: the default archs)"
        else:
            archs = [a for a in seen if a >= MIN_ARCH]
            shown = ", ".join(f"sm_{a}" for a in seen)
            if not archs:
                return None, f"the visible GPU ({shown}) is older than sm_{MIN_ARCH}, the oldest these kernels support"
            why = f"a GPU is visible ({shown})"
    missing = missing_tools_reason()
    if missing:
        return None, f"{missing}; wanted because {why}"
    return archs, why


def install_skip_reason() -> Optional[str]:
    """Why ``pip install`` does not build the CUDA extension (None: it does; see install_plan)."""
    try:
        archs, why = install_plan()
    except ValueError as e:
        return str(e)
    return None if archs else why


def ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


# ------------------------------------------------------------------------------- build


def _defines(archs: Sequence[int], src_hash: str) -> List[str]:
    sass = ",".join(str(a) for a in archs)
    return [f'-DOLK_SASS_ARCHS="{sass}"', f'-DOLK_PTX_ARCHS="{max(archs)}"', f'-DOLK_SOURCE_HASH="{src_hash}"']


def nvcc_commands(src: Path, out_file: Path, obj_dir: Path, archs: Sequence[int], src_hash: str,
                  nvcc: str = "nvcc", verbose_ptxas: bool = False) -> Tuple[List[List[str]], List[str]]:
    """(compile commands, link command) of the direct nvcc build: one object per translation
    unit (compiled in parallel), linked into a Python extension with the static CUDA runtime."""
    py_inc = sysconfig.get_paths()["include"]
    common = [nvcc, "-O3", "-std=c++17", "-DNDEBUG", "-Xcompiler", "-fPIC,-fvisibility=hidden",
              f"-I{src / 'include'}"]
    compiles = []
    for tu in TRANSLATION_UNITS:
        cmd = common + ["-o", str(obj_dir / (tu + ".o")), "-c", str(src / tu)]
        if tu.endswith(".cu"):
            cmd[1:1] = gencode_flags(archs) + (["-Xptxas", "-v"] if verbose_ptxas else [])
        else:
            cmd[1:1] = _defines(archs, src_hash) + [f"-I{pybind11_include() or ''}", f"-I{py_inc}"]
        compiles.append(cmd)
    link = [nvcc, "-shared", "--cudart", "static", *gencode_flags(archs), "-o", str(out_file)]
    link += [str(obj_dir / (tu + ".o")) for tu in TRANSLATION_UNITS]
    return compiles, link


def _run(cmd: Sequence[str], log) -> None:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write(proc.stdout)
    log.flush()
    if proc.returncode != 0:
        lines = proc.stdout.strip().splitlines()
        last = next((ln.strip() for ln in reversed(lines) if "error" in ln.lower() or "fatal" in ln.lower()),
                    lines[-1].strip() if lines else "no output")
        tail = "\n".join(lines[-15:])
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed ({proc.returncode}): {last[:200]}\n{tail}")


def build_with_nvcc(src: Path, out_file: Path, archs: Sequence[int], log, jobs: int = 0,
                    verbose_ptxas: bool = False) -> None:
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if pybind11_include() is None:
        raise RuntimeError("pybind11 is not installed (pip install pybind11)")
    with tempfile.TemporaryDirectory(prefix="olk-obj-") as obj:
        compiles, link = nvcc_commands(src, out_file, Path(obj), archs, source_hash(src), nvcc, verbose_ptxas)
        with ThreadPoolExecutor(max_workers=max(1, jobs or os.cpu_count() or 1)) as pool:
            for f in [pool.submit(_run, c, log) for c in compiles]:
                f.result()
        _run(link, log)


def build_with_cmake(src: Path, out_file: Path, archs: Sequence[int], log, build_dir: Path,
                     jobs: int = 0, verbose_ptxas: bool = False) -> None:
    """Configure and build CMakeLists.txt (next to csrc/) with Ninja, copy the module to out_file."""
    cmake, ninja = _tool("cmake", "cmake"), _tool("ninja", "ninja")
    if cmake is None or ninja is None:
        raise RuntimeError("cmake and ninja are needed for the CMake build (pip install cmake ninja)")
    root = src.parent
    build_dir.mkdir(parents=True, exist_ok=True)
    cfg = [cmake, "-S", str(root), "-B", str(build_dir), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
           "-DCMAKE_BUILD_TYPE=Release", f"-DOPENLORA_CUDA_ARCHS={';'.join(str(a) for a in archs)}",
           f"-DOPENLORA_SOURCE_HASH={source_hash(src)}", f"-DPython_EXECUTABLE={sys.executable}",
           f"-DOPENLORA_PTXAS_VERBOSE={'ON' if verbose_ptxas else 'OFF'}"]
    nvcc = find_nvcc()
    if nvcc:
        cfg.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    if pybind11_cmake_dir():
        cfg.append(f"-Dpybind11_DIR={pybind11_cmake_dir()}")
    _run(cfg, log)
    _run([cmake, "--build", str(build_dir), "--parallel", str(max(1, jobs or os.cpu_count() or 1))], log)
    built = sorted(build_dir.glob(MODULE_NAME + "*" + ext_suffix()))
    if not built:
        raise RuntimeError(f"the CMake build produced no {MODULE_NAME}{ext_suffix()} in {build_dir}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built[0], out_file)


def verbose_ptxas_requested() -> bool:
    return os.environ.get("OPENLORA_PTXAS_VERBOSE", "0").lower() in ("1", "true", "yes", "on")


def build_extension(out_file: Path, archs: Sequence[int], build_dir: Path, log, jobs: int = 0,
                    builder: Optional[str] = None) -> str:
    """Build the module into out_file (install-time route). Returns the builder used."""
    src = source_dir()
    if src is None:
        raise RuntimeError("the CUDA sources (csrc/) were not found")
    builder = builder or os.environ.get("OPENLORA_CUDA_BUILDER") or ""
    if builder not in ("", "cmake", "nvcc"):
        raise ValueError(f"OPENLORA_CUDA_BUILDER: expected 'cmake' or 'nvcc', got {builder!r}")
    if not builder:
        builder = "cmake" if (_tool("cmake", "cmake") and _tool("ninja", "ninja")
                              and (src.parent / "CMakeLists.txt").is_file()) else "nvcc"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if builder == "cmake":
        build_with_cmake(src, out_file, archs, log, build_dir, jobs, verbose_ptxas_requested())
    else:
        build_with_nvcc(src, out_file, archs, log, jobs, verbose_ptxas_requested())
    return builder


# ------------------------------------------------------------------------- cache, lock


def cache_root() -> Path:
    env = os.environ.get("OPENLORA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "openlora_kernels"


def cache_entry(src_hash: str, arch: int) -> Path:
    return cache_root() / f"{src_hash}-sm{arch}"


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive lock on ``path`` (created if needed) across processes (POSIX flock)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout:.0f}s for the build lock {path}") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def load_module_file(path: Path, tag: str = ""):
    """Import an extension module file under a name of its own (so several can coexist)."""
    name = f"openlora_kernels_cuda_{tag or 'x'}.{MODULE_NAME}"
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def load_or_build(arch: int, *, builder=None) -> Tuple[Optional[object], Optional[str], Optional[Path]]:
    """The extension built from the current sources for ``arch`` from the cache, building it on
    a miss. Returns (module, None, path) or (None, reason, log path or None). Never raises."""
    src = source_dir()
    if src is None:
        return None, "the CUDA sources (csrc/) are not present in this install", None
    try:
        src_hash = source_hash(src)
        entry = cache_entry(src_hash, arch)
        target = entry / (MODULE_NAME + ext_suffix())
        log_path = entry / "build.log"
        failed = entry / FAILED_MARKER
        rebuild = os.environ.get("OPENLORA_CUDA_REBUILD", "0").lower() in ("1", "true", "yes", "on")
        with file_lock(entry.parent / f"{entry.name}.lock"):
            if failed.exists() and not rebuild:
                return None, f"an earlier on-first-use build failed ({failed.read_text().strip()}); " \
                             f"see {log_path}, set OPENLORA_CUDA_REBUILD=1 to retry", log_path
            if not target.exists():
                why = missing_tools_reason()
                if why:
                    return None, why, None
                entry.mkdir(parents=True, exist_ok=True)
                tmp = entry / f".{MODULE_NAME}.{os.getpid()}.tmp{ext_suffix()}"
                with open(log_path, "w", encoding="utf-8") as log:
                    try:
                        (builder or build_with_nvcc)(src, tmp, [arch], log)
                    except Exception as e:  # record, report, never raise into an import
                        failed.write_text(str(e).splitlines()[0][:300] + "\n")
                        with contextlib.suppress(OSError):
                            tmp.unlink()
                        return None, f"the on-first-use build for sm_{arch} failed: {str(e).splitlines()[0]} " \
                                     f"(log: {log_path})", log_path
                os.replace(tmp, target)  # atomic: a reader sees no file or a whole one
                with contextlib.suppress(OSError):
                    failed.unlink()
        return load_module_file(target, f"{src_hash}_sm{arch}"), None, target
    except Exception as e:
        return None, f"the on-first-use build for sm_{arch} failed: {e!r}", None


# ------------------------------------------------------------------------ ptxas report

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _demangle(names: Sequence[str]) -> List[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return out if proc.returncode == 0 and len(out) == len(names) else list(names)


def ptxas_resources(text: str) -> List[dict]:
    """Per kernel and arch: registers, stack frame, spill stores / loads, static shared memory,
    read from `-Xptxas -v` output."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "stack": 0,
                   "spill_stores": 0, "spill_loads": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(v) for v in m.groups())
            continue
        m = _USED.search(line)
        if m and cur["registers"] is None:
            cur["registers"] = int(m.group(1))
            cur["smem"] = int(m.group(2) or 0)
    for row, name in zip(rows, _demangle([r["kernel"] for r in rows])):
        row["kernel"] = name.replace("void openlora::", "").replace("(openlora::SgmvParams)", "")
    return rows


def resource_table(rows: Sequence[dict]) -> str:
    """Markdown table of ptxas_resources rows."""
    out = ["| kernel | arch | registers | stack (B) | spill stores (B) | spill loads (B) | static smem (B) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"])):
        out.append(f"| `{r['kernel']}` | {r['arch']} | {r['registers']} | {r['stack']} | {r['spill_stores']} | "
                   f"{r['spill_loads']} | {r['smem']} |")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Fill the first-use cache ahead of time (--arch 90), or check a ptxas -v log for spills
    (--ptxas-report LOG; exit status 1 on any spill or stack frame)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--arch", type=int, help="build the cache entry for this compute capability, e.g. 90")
    ap.add_argument("--ptxas-report", metavar="LOG", help="print the resource table of a -Xptxas -v build log")
    opts = ap.parse_args(argv)
    if opts.ptxas_report:
        rows = ptxas_resources(Path(opts.ptxas_report).read_text(encoding="utf-8", errors="replace"))
        print(resource_table(rows))
        bad = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["stack"]]
        print(f"\n{len(rows)} kernels, {len(bad)} with spills or a stack frame")
        for r in bad:
            print(f"SPILL {r['arch']} {r['kernel']}: stack {r['stack']} B, stores {r['spill_stores']} B, "
                  f"loads {r['spill_loads']} B")
        return 1 if bad or not rows else 0
    if opts.arch is None:
        ap.error("give --arch or --ptxas-report")
    mod, reason, path = load_or_build(opts.arch)
    if mod is None:
        print(f"build failed: {reason}", file=sys.stderr)
        return 1
    print(f"ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
