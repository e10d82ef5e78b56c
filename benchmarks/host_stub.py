"""Launch stubs for measuring (and testing) the host side of the GPU backends on a machine without a GPU.

What is real and what is stubbed (see docs/kernels.md, "Host cost per call"):

* **Triton** (:func:`stub_triton`): the CUDA driver library is replaced by a stand-in,
  ``benchmarks/fake_libcuda.c`` compiled here into a ``libcuda.so.1`` (gcc; loaded before
  Triton looks for the driver and named by ``TRITON_LIBCUDA_PATH``): its ``cuLaunchKernelEx``
  counts the launch and returns success. Triton's active driver is :class:`FakeCudaDriver`: it
  reports an sm_90 device 0 with 132 SMs and stream 0, and "loads" a compiled kernel without a
  GPU (a fake module / function handle). Everything else is Triton's real code, built against
  the stand-in: ``JITFunction.run`` (binder, specialisation key, kernel cache; a cache miss
  compiles the kernel for sm_90 with the real compiler, offline), the ``CompiledKernel``,
  ``CudaLauncher`` (its Python part and its C launcher, which parses and packs every argument
  into the kernel's parameter buffer). Not run: the driver's own work in ``cuLaunchKernelEx``
  (a GPU's driver takes a few microseconds there). Tensors are CPU tensors passed where device
  pointers go: their addresses are real but never dereferenced (nothing runs), and the binder
  specialises on them exactly as on device pointers. Works with Triton 3.9 (a generic C
  launcher in its utilities) and 3.6 (a C launcher compiled per kernel signature).
* **CUDA** (:func:`stub_cuda`): the compiled ``_cuda_sgmv`` binding (built with nvcc, sm_90) runs
  with its launch stub on (``set_launch_stub``): argument parsing, validation, the launch plan
  and kernel selection run in C++ as on a GPU; ``cudaLaunchKernel`` is replaced by recording the
  launch (kernel, grid, the parameter struct's bytes). The SM count is the stub's (132, an H100 /
  H200). ``torch.cuda``'s current device and stream, which a CPU build of torch cannot give, come
  from cheap stand-ins (device 0, stream 0); on a GPU they are one C call each.

Both return a context manager that undoes everything it patched.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Dict, Iterator, List, Optional


class StubUnavailable(RuntimeError):
    """The installed Triton (or the CUDA binding) cannot be stubbed on this machine."""


# ------------------------------------------------------------------------------------- Triton


_FAKE_LIB: Dict[str, Any] = {}


def fake_libcuda():
    """The stand-in driver library (built once per process into a temp dir, loaded globally so
    that Triton's modules linked against ``libcuda.so.1`` and its ``dlopen`` find it)."""
    if "lib" in _FAKE_LIB:
        return _FAKE_LIB["lib"]
    import ctypes
    import os
    import shutil
    import subprocess
    import tempfile

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise StubUnavailable("no C compiler to build the stand-in libcuda.so.1")
    d = tempfile.mkdtemp(prefix="olk_fake_libcuda_")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_libcuda.c")
    so = os.path.join(d, "libcuda.so.1")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", so, src], check=True)
    os.symlink(so, os.path.join(d, "libcuda.so"))
    lib = ctypes.CDLL(so, mode=ctypes.RTLD_GLOBAL)
    lib.fake_cuda_launches.restype = ctypes.c_longlong
    os.environ["TRITON_LIBCUDA_PATH"] = d
    _FAKE_LIB.update(lib=lib, dir=d)
    return lib


class _FakeUtils:
    """Triton's CUDA utilities with the GPU-facing calls answered here; the rest (3.9: the
    generic ``launch`` and its signature helpers) are Triton's real C functions."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        if self._real is None:
            raise AttributeError(name)
        return getattr(self._real, name)

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024          # module, function, n_regs, n_spills, n_max_threads

    def unload_module(self, module):
        pass

    def get_current_device(self):
        return 0

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def is_stream_capturing(self, stream):
        return False


class FakeCudaDriver:
    """Triton's driver interface for an sm_90 device that is not there (see the module docstring)."""

    def __init__(self, arch: int = 90):
        fake_libcuda()
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia import driver as nvdriver

        self.launcher_cls = nvdriver.CudaLauncher
        self.utils = _FakeUtils(nvdriver.CudaUtils())   # compiles Triton's driver.c against the stand-in
        self._target = GPUTarget("cuda", arch, 32)
        self._arch = arch

    @property
    def launches(self) -> int:
        """Launches that reached the stand-in driver so far."""
        return int(fake_libcuda().fake_cuda_launches())

    # DriverBase / GPUDriver
    def is_active(self):
        return True

    def get_current_target(self):
        return self._target

    # device 0, stream 0 (builtins: C functions, as torch's _cuda_getDevice / _cuda_getCurrentRawStream
    # that a real driver hands out, so the stub does not add Python frames to a call)
    get_current_device = staticmethod(int)            # int() == 0
    get_current_stream = staticmethod(abs)            # abs(0) == 0: the stream of device 0

    def set_current_device(self, device):
        pass

    def get_device_capability(self, device=None):
        return divmod(self._arch, 10)

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_device_interface(self):
        import torch
        return torch.cuda

    def get_benchmarker(self):
        raise StubUnavailable("no benchmarking without a GPU")

    def allocate_default_profile_scratch(self, size, alignment, stream):
        return None

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)


def _normalise(v):
    import torch
    return v.data_ptr() if isinstance(v, torch.Tensor) else v


def _recording_init(init, record: List[Any]):
    """CudaLauncher.__init__ whose launcher records (grid, stream, function, kernel arguments) of
    every launch (tensors as their data pointers) before calling Triton's C launch function."""
    def wrapped(self, src, metadata):
        init(self, src, metadata)
        real = self.launch
        generic = hasattr(self, "arg_annotations")      # Triton 3.9: the arguments come as one tuple

        def launch(*a):
            kargs = a[-1] if generic else a[13:]
            record.append((tuple(a[:3]), a[3], a[4], tuple(_normalise(v) for v in kargs)))
            return real(*a)
        self.launch = launch
    return wrapped


@contextlib.contextmanager
def stub_triton(record: Optional[List[Any]] = None) -> Iterator[FakeCudaDriver]:
    """Run the Triton backend with launches stubbed (module docstring): backend "triton" resolves
    for CPU tensors, its launchers use the GPU heuristic configurations and an sm_90 device with
    132 SMs, and every launch ends in the stand-in driver's ``cuLaunchKernelEx``. ``record``: a
    list that receives ``(grid, stream, function, kernel arguments)`` of every launch made by
    launchers created inside the block (what the C launcher was given)."""
    import triton
    from triton.runtime import driver

    from openlora_kernels.ops import backends, configs, triton_sgmv

    if backends.triton_interpreter_enabled():
        raise StubUnavailable("unset TRITON_INTERPRET: the stub compiles the kernels for sm_90")
    fake = FakeCudaDriver()
    from triton.backends.nvidia import driver as nvdriver
    init = nvdriver.CudaLauncher.__init__
    if record is not None:
        nvdriver.CudaLauncher.__init__ = _recording_init(init, record)
    saved = (driver._active, backends._triton_reason, triton_sgmv.kernel_config, triton_sgmv.device_facts)
    driver.set_active(fake)
    backends._triton_reason = lambda device_type: None
    triton_sgmv.kernel_config = lambda kind, device, **shape: {
        **configs.heuristic_config(kind, **shape), **configs._overrides.get(kind, {})}
    triton_sgmv.device_facts = lambda device: ("stub", 132)
    _ = triton
    try:
        yield fake
    finally:
        nvdriver.CudaLauncher.__init__ = init
        driver._active, backends._triton_reason, triton_sgmv.kernel_config, triton_sgmv.device_facts = saved


# --------------------------------------------------------------------------------------- CUDA


class _NoDevice:
    """Stand-in for ``torch.cuda.device(d)`` on a CPU build (a no-op context manager)."""

    def __init__(self, device=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cuda_module():
    try:
        from openlora_kernels.ops import _cuda_sgmv  # type: ignore[attr-defined]
    except ImportError as e:
        raise StubUnavailable(f"the CUDA binding is not built (bash .ci/compile_cuda.sh): {e}") from e
    return _cuda_sgmv


@contextlib.contextmanager
def stub_cuda(python_level: bool = False) -> Iterator[Any]:
    """Run the CUDA backend with launches stubbed (module docstring). ``python_level``: replace
    the binding's ``run`` by a Python no-op instead (what a binding without a launch stub, such
    as the one before bound plans, can be measured with: a lower bound, it skips the C++ part)."""
    import torch

    from openlora_kernels.ops import backends, cuda_ext

    mod = _cuda_module()
    if python_level:
        real = mod
        mod = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
        mod.run = lambda op, dtype, block_m, args, slices, stream: None
    elif not hasattr(mod, "set_launch_stub"):
        raise StubUnavailable("this CUDA binding has no launch stub (built from older sources)")
    saved_state = dict(cuda_ext._state)
    saved = (backends._cuda_reason, torch.cuda.device, torch.cuda.current_stream,
             getattr(cuda_ext, "_current_device", None), getattr(cuda_ext, "_current_stream", None))
    cuda_ext._state.clear()
    cuda_ext._state.update(module=mod, origin="stub", reason=None)
    backends._cuda_reason = lambda device_type: None
    torch.cuda.device = _NoDevice
    torch.cuda.current_stream = lambda device=None: types.SimpleNamespace(cuda_stream=0)
    if hasattr(cuda_ext, "_current_device"):
        cuda_ext._current_device = int                # builtins (C functions, like torch's): 0
        cuda_ext._current_stream = abs                # abs(device 0) == stream 0
    if not python_level:
        mod.set_launch_stub(True, 132)
    try:
        yield mod
    finally:
        if not python_level:
            mod.set_launch_stub(False, 0)
        cuda_ext._state.clear()
        cuda_ext._state.update(saved_state)
        backends._cuda_reason, torch.cuda.device, torch.cuda.current_stream = saved[:3]
        if saved[3] is not None:
            cuda_ext._current_device, cuda_ext._current_stream = saved[3], saved[4]


def stub_info() -> Dict[str, str]:
    """How the launches are stubbed, for the results rows."""
    return {"triton_stub": "stand-in libcuda.so.1 (cuLaunchKernelEx returns at once) + FakeCudaDriver (sm_90, "
                           "device 0, stream 0): JIT, binder, cache, CudaLauncher and its C arg packing real",
            "cuda_stub": "binding's set_launch_stub: C++ parse/plan/select real, cudaLaunchKernel not run; "
                         "torch.cuda current device/stream stand-ins"}
