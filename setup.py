"""Build script. The pure-Python package installs everywhere; two optional extensions:

* the native CPU kernels (csrc/cpu/ -> openlora_kernels/ops/_cpu_sgmv), built with the machine's
  C++ compiler against the Python C API (nine small sources compiled in parallel: about 12 s on
  2 cores; OPENLORA_SKIP_CPU_EXT=1 skips; a failure only warns and backend "cpu" then reports
  itself unavailable); a later editable install reuses the in-place module while it is newer
  than its sources and this file;
* the CUDA extension (csrc/ -> openlora_kernels/ops/_cuda_sgmv), built only when asked
  (OPENLORA_CUDA_ARCHS) or when a GPU is visible, and nvcc and pybind11 are found (below).

    pip install -e . --no-deps --no-build-isolation     # GPU machines: uses the env's tools
    pip install -e .                                    # isolated build: pybind11/cmake/ninja from PyPI
    OPENLORA_CUDA_ARCHS=90 pip install -e .             # build sm_90 now, GPU or not
    OPENLORA_SKIP_CUDA=1 pip install -e .               # never build the extension

Without a GPU (unless OPENLORA_CUDA_ARCHS is set), without nvcc, or with OPENLORA_SKIP_CUDA=1,
nothing CUDA is compiled: backend "cuda" builds for its GPU on first use, or reports why it
cannot. A failing build only warns unless OPENLORA_CUDA_REQUIRED=1. The CUDA sources are also
copied into the package (openlora_kernels/ops/_csrc) so that a wheel built without nvcc can build
on first use. torch is never needed to build: the extension links to no libtorch. See docs/cuda.md.

What is built, what is skipped and why is printed to the terminal (pip hides a build's own
output unless -v), else to the build's output.
"""
import concurrent.futures
import contextlib
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_cuda_build():
    """openlora_kernels/ops/cuda_build.py by path (stdlib only; importing the package needs torch)."""
    path = ROOT / "openlora_kernels" / "ops" / "cuda_build.py"
    spec = importlib.util.spec_from_file_location("_openlora_cuda_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cuda_build = _load_cuda_build()


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    """A line for the person installing: pip captures a build's stdout and stderr and shows them
    only with -v, so it goes to the controlling terminal when there is one, else to stdout."""
    line = f"openlora_kernels: {msg}\n"
    if not sys.stdout.isatty():
        try:
            with open("/dev/tty", "w", encoding="utf-8") as tty:
                tty.write(line)
            return
        except OSError:
            pass
    sys.stdout.write(line)
    sys.stdout.flush()


def _newest_input(ext) -> float:
    """mtime of the newest file the extension is built from: its sources, the headers beside
    them, its declared depends and this build script."""
    files = {ROOT / f for f in list(ext.sources) + list(getattr(ext, "depends", []) or [])}
    for d in {f.parent for f in files}:
        files.update(p for p in d.glob("*") if p.suffix in (".h", ".hpp", ".cpp", ".cc", ".cuh"))
    files.add(ROOT / "setup.py")
    return max(p.stat().st_mtime for p in files if p.is_file())


_SKIPPED = []   # "not building ..." lines: said once, by the build itself (pip runs setup.py once per hook)


def _say_skipped() -> None:
    while _SKIPPED:
        _say(_SKIPPED.pop(0))


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (openlora_kernels/ops/_csrc) for the on-first-use build."""

    def run(self):
        _say_skipped()
        super().run()
        src = ROOT / "csrc"
        if src.is_dir() and not getattr(self, "editable_mode", False):
            dst = Path(self.build_lib) / "openlora_kernels" / "ops" / "_csrc"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


class BuildCudaExtension(build_ext):
    """Builds _cuda_sgmv with CMake + Ninja (or nvcc directly), never fatally unless required;
    other extensions (the CPU kernels) the usual setuptools way, also never fatally."""

    def run(self):
        # build_ext.run clears `inplace` while it builds into build/; remember where the module goes
        self._olk_inplace = bool(self.inplace or getattr(self, "editable_mode", False))
        _say_skipped()
        super().run()

    def _inplace_file(self, ext) -> Path:
        return ROOT.joinpath(*ext.name.split(".")[:-1]) / Path(self.get_ext_filename(ext.name)).name

    def build_extension(self, ext):
        if not ext.name.endswith("_cuda_sgmv"):
            return self._build_cpu_extension(ext)
        out = Path(self.get_ext_fullpath(ext.name))
        archs = getattr(ext, "olk_archs", None) or cuda_build.install_archs()
        log_path = Path(self.build_temp) / "openlora_cuda_build.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        _say(f"compiling the CUDA extension for {', '.join(f'sm_{a}' for a in archs)} "
             f"({getattr(ext, 'olk_why', 'asked for')}; minutes on a few cores; log: {log_path})")
        t0 = time.perf_counter()
        try:
            with open(log_path, "w", encoding="utf-8") as log:
                used = cuda_build.build_extension(out, archs, Path(self.build_temp) / "cmake", log,
                                                  jobs=self.parallel or 0)
            print(f"openlora_kernels: built {out.name} with {used}", flush=True)
            _say(f"built the CUDA extension in {time.perf_counter() - t0:.0f} s")
        except Exception as e:
            if _flag("OPENLORA_CUDA_REQUIRED"):
                raise
            _say(f"WARNING: the CUDA extension was not built ({str(e).splitlines()[0]}); "
                 "backend 'cuda' will try to build on first use (see docs/cuda.md)")
            print(e, file=sys.stderr, flush=True)
        if log_path.exists() and _flag("OPENLORA_PTXAS_VERBOSE"):
            sys.stdout.write(log_path.read_text())

    def _build_cpu_extension(self, ext):
        out = Path(self.get_ext_fullpath(ext.name))
        inplace = self._inplace_file(ext)
        if (getattr(self, "_olk_inplace", False) and not self.force and inplace.is_file()
                and inplace.stat().st_mtime >= _newest_input(ext)):
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.resolve() != inplace.resolve():
                shutil.copy2(inplace, out)
            _say(f"the native CPU extension is up to date ({inplace.relative_to(ROOT)} is newer than its "
                 "sources): not recompiled")
            return None
        _say(f"compiling the native CPU extension ({', '.join(ext.sources)} -> {ext.name}) with the "
             "machine's C++ compiler")
        t0 = time.perf_counter()
        if out.is_file() and out.stat().st_mtime < _newest_input(ext):
            out.unlink()   # setuptools compares with the .cpp sources only, not the headers
        try:
            with _parallel_compile(self.compiler, len(ext.sources)):
                super().build_extension(ext)
        except Exception as e:
            _say(f"WARNING: {ext.name} was not built ({e}); backend 'cpu' will report itself unavailable "
                 "and 'auto' uses 'torch' on the CPU")
            return None
        _say(f"built the native CPU extension in {time.perf_counter() - t0:.0f} s")
        return None


@contextlib.contextmanager
def _parallel_compile(compiler, n_sources: int):
    """Compile an extension's sources in parallel (setuptools compiles them one after the other):
    the CPU extension is nine translation units of one to four seconds each. Unix compilers only (their
    compile() is _setup_compile + _compile per object, which this reproduces); jobs: the CPUs, at
    most one per source, or OPENLORA_BUILD_JOBS."""
    jobs = int(os.environ.get("OPENLORA_BUILD_JOBS") or 0) or min(n_sources, os.cpu_count() or 1)
    if jobs <= 1 or getattr(compiler, "compiler_type", "") != "unix":
        yield
        return
    serial = compiler.compile

    def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)

        def one(obj):
            if obj in build:
                src, ext = build[obj]
                compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

        first = [o for o in objects if o in build and os.path.basename(build[o][0]) in SLOW_SOURCES]
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:    # the slowest start first
            list(pool.map(one, first + [o for o in objects if o not in first]))
        return objects

    compiler.compile = compile
    try:
        yield
    finally:
        compiler.compile = serial


CPU_KERNELS = [f"kernels_{isa}_{dt}.cpp" for isa in ("v4", "v3", "base") for dt in ("bf16", "f16", "f32")
               if (isa, dt) != ("v4", "f16")]         # (x86-64-v4 CPUs run the v3 fp16 kernels)
CPU_KERNELS += ["kernels_v3_e4m3.cpp", "kernels_base_e4m3.cpp"]   # fp8 weights (v4 CPUs run v3's)
CPU_SOURCES = ["csrc/cpu/bindings_cpu.cpp"] + [f"csrc/cpu/{k}" for k in CPU_KERNELS]
SLOW_SOURCES = tuple(k for k in CPU_KERNELS if not k.endswith("f32.cpp"))   # 3-4 s each; the rest 1-2 s


def _cpu_extension():
    if _flag("OPENLORA_SKIP_CPU_EXT"):
        _SKIPPED.append("not building the native CPU extension: OPENLORA_SKIP_CPU_EXT is set")
        return []
    # -O2: the kernels' loops are explicit SIMD (omp simd, vector types), so -O3's extra unrolling
    # only doubled the compile time (measured: the same speed); -g0 overrides Python's -g (debug
    # info of the templates was half of the compile time).
    flags = ["-O2", "-std=c++17", "-fvisibility=hidden", "-g0", "-Wno-psabi"]
    if sys.platform != "win32":
        flags.append("-fopenmp-simd")   # SIMD pragmas only: no OpenMP runtime is linked
    return [Extension("openlora_kernels.ops._cpu_sgmv", sources=CPU_SOURCES,
                      include_dirs=["csrc/cpu"], depends=["csrc/cpu/sgmv_cpu.h", "csrc/cpu/sgmv_cpu_kernels.h", "csrc/cpu/sgmv_cpu_isa.inc"],
                      extra_compile_args=flags, language="c++", optional=True)]


def _cuda_extension():
    try:
        archs, why = cuda_build.install_plan()
    except Exception as e:  # an unreadable OPENLORA_CUDA_ARCHS; never break a pure-Python install
        if _flag("OPENLORA_CUDA_REQUIRED"):
            raise
        archs, why = None, str(e)
    if not archs:
        _SKIPPED.append(f"not building the CUDA extension: {why}")
        return []
    ext = Extension("openlora_kernels.ops._cuda_sgmv", sources=[])
    ext.olk_archs, ext.olk_why = archs, why
    return [ext]


def _ext_modules():
    return _cpu_extension() + _cuda_extension()


setup(
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": BuildCudaExtension, "build_py": BuildPyWithSources},
)
