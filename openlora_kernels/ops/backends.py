"""Which kernel backends can run here, why the others cannot, and what "auto" picks.

Backends:
  torch   pure PyTorch, any device: the reference (ops/torch_ref.py)
  cpu     native CPU kernels (csrc/cpu/, ops/cpu_ext.py) for decode-like batches, the torch GEMMs
          for prefill-like ones; built by pip install with the machine's C++ compiler
  triton  Triton kernels (ops/triton_sgmv.py): CUDA tensors on a GPU, or CPU tensors under
          Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)
  cuda    hand-written CUDA kernels from csrc/ (ops/cuda_ext.py)
  auto    the preferred usable one for the tensors' device: triton > cuda > torch on a GPU
          (triton first until GPU benchmarks show the CUDA kernels ahead; see
          docs/benchmarks.md); on the CPU: cpu when built, else torch (the Triton interpreter is
          for testing, not speed)

Nothing here touches the GPU at import time; availability is computed on first use and cached.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")
BACKEND_CHOICES = ("auto",) + BACKENDS


class BackendUnavailableError(RuntimeError):
    """A known backend was asked for but cannot run on this machine / these tensors."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    usable: bool
    reason: str  # why it is usable (what it runs on) or why not

    def __str__(self) -> str:
        return f"{self.name}: {'usable' if self.usable else 'unavailable'} ({self.reason})"


class Backends(Dict[str, BackendInfo]):
    """What :func:`available_backends` returns: a dict ``{name: BackendInfo}`` (index it, iterate
    it, ``.items()``...) that prints as a table of the backends, whether each is usable, and why."""

    def __init__(self, device_type: str, infos: Dict[str, BackendInfo]):
        super().__init__(infos)
        self.device_type = device_type

    def __str__(self) -> str:
        width = max([len("backend")] + [len(k) for k in self])
        lines = [f"kernel backends for {self.device_type} tensors (\"auto\" picks "
                 f"{resolve_backend('auto', torch.device(self.device_type))!r}):",
                 f"  {'backend':<{width}}  {'usable':<6}  why"]
        for name, info in self.items():
            lines.append(f"  {name:<{width}}  {'yes' if info.usable else 'no':<6}  {info.reason}")
        return "\n".join(lines)

    __repr__ = __str__


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - broken installs
        return f"importing triton failed: {e!r}"
    return None


def _cuda_reason(device_type: str) -> Optional[str]:
    """None when the CUDA backend can run on ``device_type``, else the reason it cannot."""
    if device_type != "cuda":
        return "the CUDA kernels run on CUDA tensors only"
    from . import cuda_ext

    return cuda_ext.unavailable_reason()


def _cpu_reason(device_type: str) -> Optional[str]:
    """None when the native CPU backend can run on ``device_type``, else the reason it cannot."""
    if device_type != "cpu":
        return "the native CPU kernels run on CPU tensors only"
    from . import cpu_ext

    return cpu_ext.unavailable_reason()


def _triton_reason(device_type: str) -> Optional[str]:
    err = _triton_import_error()
    if err:
        return err
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if torch.version.hip is not None:
            return "ROCm is not supported by these kernels yet"
        return None
    if device_type == "cpu":
        if triton_interpreter_enabled():
            return None
        return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton"
    return f"device type {device_type!r} is not supported"


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def available_backends(device: Union[str, torch.device, None] = None) -> Backends:
    """For each backend, whether it is usable for tensors on ``device`` and why (not): a dict
    ``{name: BackendInfo}`` that prints as a table.

    ``device`` defaults to the GPU when there is one, else the CPU.

    >>> import openlora_kernels as olk
    >>> info = olk.available_backends("cpu")
    >>> info["torch"].usable, sorted(info)
    (True, ['cpu', 'cuda', 'torch', 'triton'])
    >>> print(info)                                                   # doctest: +ELLIPSIS
    kernel backends for cpu tensors ("auto" picks ...):
      backend  usable  why
      torch    yes     pure PyTorch on cpu
      cpu      ...
      triton   ...
      cuda     no      the CUDA kernels run on CUDA tensors only
    """
    dev_type = torch.device(device).type if device is not None else _default_device_type()
    out: Dict[str, BackendInfo] = {}
    out["torch"] = BackendInfo("torch", True, f"pure PyTorch on {dev_type}")
    r = _cpu_reason(dev_type)
    out["cpu"] = BackendInfo("cpu", r is None, "compiled csrc/cpu/ extension" if r is None else r)
    r = _triton_reason(dev_type)
    why = "Triton interpreter on CPU (slow; for tests)" if dev_type == "cpu" else "Triton JIT on the GPU"
    out["triton"] = BackendInfo("triton", r is None, why if r is None else r)
    r = _cuda_reason(dev_type)
    out["cuda"] = BackendInfo("cuda", r is None, "compiled csrc/ extension" if r is None else r)
    return Backends(dev_type, out)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a user's backend choice into a concrete usable backend name, or raise."""
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"backend: unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    dev_type = device.type
    if backend == "auto":
        if dev_type == "cuda":
            if _triton_reason(dev_type) is None:
                return "triton"
            if _cuda_reason(dev_type) is None:
                return "cuda"
        elif dev_type == "cpu" and _cpu_reason(dev_type) is None:
            return "cpu"
        return "torch"
    if backend == "torch":
        return "torch"
    reason = {"triton": _triton_reason, "cuda": _cuda_reason, "cpu": _cpu_reason}[backend](dev_type)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable for {dev_type} tensors: {reason}")
    return backend
