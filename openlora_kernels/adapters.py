"""PEFT LoRA adapters: where they come from, how they are read, and what is accepted.

An adapter is what PEFT's ``save_pretrained`` writes: ``adapter_config.json`` plus
``adapter_model.safetensors`` (or, from old PEFT versions, ``adapter_model.bin``). This module
turns such an adapter into :class:`AdapterWeights`: for every module it targets, ``lora_A.weight``
[r, K], ``lora_B.weight`` [N, r] (an embedding's ``lora_embedding_A`` / ``_B``; a DoRA magnitude)
and PEFT's scaling for that module. It never touches a model;
matching the modules to a model is the job of ``hf_patch.py``, which can pass an
:class:`Expectation` (a check of the tensor shapes, a byte limit) that refuses a weights file
from its header, before its data is read.

Sources (``resolve_source``):
  * a local directory (``str`` or ``os.PathLike``);
  * a Hugging Face Hub repo id ``"org/name"`` (through huggingface_hub: the local cache first,
    ``HF_HUB_OFFLINE=1`` honoured at call time; :class:`HubSource` takes a revision / cache dir).
    ``repo_id`` and ``revision`` are names, not paths (no ``.`` / ``..`` components, absolute
    paths, backslashes or NUL; a revision may contain ``/``, as in ``refs/pr/1``), and the
    snapshot directory huggingface_hub returns must lie inside the cache directory (symlinks
    resolved);
  * anything with a ``load()`` method, or a plain callable, returning exactly a pair
    ``(config, tensors)``: ``config`` the adapter_config.json contents (a dict, or a
    ``peft.LoraConfig``) and ``tensors`` a mapping of PEFT state-dict keys to tensors.
    Registries and object stores plug in there (see :class:`AdapterSource`).

The config fields that decide the output are honoured: ``r``, ``lora_alpha``, ``use_rslora``
(scaling alpha / sqrt(r) instead of alpha / r), ``rank_pattern`` and ``alpha_pattern`` (per-module
rank and alpha, matched like PEFT does: the key is a suffix regex of the module name, matched here
in linear time by :mod:`openlora_kernels.patterns`). ``r`` and the ``rank_pattern`` values must be
positive integers (an int, or an integral float like 8.0); ``lora_alpha`` and the ``alpha_pattern``
values finite numbers > 0 (bools, strings, NaN and Infinity are refused); pattern keys must be
strings the pattern matcher accepts. ``target_modules`` (list, regex or "all-linear"),
``layers_to_transform``/``layers_pattern`` and ``fan_in_fan_out`` decide which modules PEFT
created and saved; the saved tensors are the authority on that, so an adapter applies exactly to
the modules it has weights for. Also read: DoRA (``use_dora``: each module's
``lora_magnitude_vector``), embedding LoRA (``lora_embedding_A`` / ``lora_embedding_B``) and
``target_parameters`` (LoRA on a module's nn.Parameter: which parameter a saved LoRA belongs to
needs the model, given as a :data:`ParamResolver`). Fields that change the computation in ways
these kernels do not implement (LoRA bias, modules_to_save, trainable tokens, ...) raise
NotImplementedError naming them, never silently wrong output.

Files: ``adapter_config.json`` must be a UTF-8 JSON object of at most :data:`MAX_CONFIG_BYTES`.
Weights files must be non-empty regular files (symlinks to regular files, as in the Hub cache,
are followed; directories, FIFOs, devices and /proc files are refused unread). A safetensors
file is read by the small reader here: its header (at most :data:`MAX_HEADER_BYTES`) is checked
first (known dtypes, non-negative shapes whose byte sizes match their ``data_offsets``, tensors
tiling the data exactly, nothing past the end of the file), then the :class:`Expectation`, then
each tensor's bytes are read with plain reads into memory (no mmap, so a file changed or truncated
later cannot crash the process). A ``.bin`` file is never unpickled: it is read with
``torch.load(weights_only=True)``, which accepts tensors only, after its size is checked.

Tensors must be dense (strided) tensors with data (not on the meta device), and the same tensor
under two key spellings (with and without ``base_model.model.``, ``lora_A.weight`` and
``lora_A.default.weight``) must hold equal values. Every error names the file, key or field:
:class:`AdapterFormatError` (a ValueError) for malformed input.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
import reprlib
import stat
from dataclasses import dataclass, field
from typing import (Any, BinaryIO, Callable, Dict, Mapping, Optional, Protocol, Tuple, Union,
                    runtime_checkable)

import torch

from .patterns import PatternError, compile_pattern, peft_key_matches

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 16 << 20        # an adapter_config.json is a few KiB
MAX_HEADER_BYTES = 100 << 20       # a safetensors header (JSON) is ~100 bytes per tensor

# Config fields whose "set" value changes the forward pass in a way plain LoRA does not cover.
_UNSUPPORTED_FIELDS = {
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained copies of whole modules",
    "trainable_token_indices": "trained token embeddings",
    "layer_replication": "replicated layers",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
}
_PEFT_PREFIX = "base_model.model."
# lora_A / lora_B of a linear layer (or of a wrapped parameter), with an adapter-name infix or not
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
# an nn.Embedding's LoRA (ParameterDict entries: no ".weight")
_EMB_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$")
# DoRA's magnitude vector (saved as "...lora_magnitude_vector"; in a model "...lora_magnitude_vector.default.weight")
_MAG_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
# safetensors dtype names -> torch dtypes (those this torch has)
_ST_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("U16", "uint16"), ("I16", "int16"), ("U32", "uint32"),
    ("I32", "int32"), ("U64", "uint64"), ("I64", "int64"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("F32", "float32"), ("F64", "float64"), ("C64", "complex64"), ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu")) if hasattr(torch, attr)}

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_show = _repr.repr                 # bounded repr for values in messages (strings, deep nesting)


class AdapterFormatError(ValueError):
    """An adapter's files or tensors are malformed (the message names the file or key)."""


@runtime_checkable
class AdapterSource(Protocol):
    """A custom place adapters come from (registry, object store, database...).

    ``load()`` returns the pair ``(config, tensors)``: the adapter_config.json contents (dict or
    ``peft.LoraConfig``) and a mapping of PEFT state-dict keys (``...q_proj.lora_A.weight``, with
    or without the ``base_model.model.`` prefix) to tensors. It may be called again later: the
    adapter pool drops adapters from host memory past its budget and re-reads them on demand.
    """

    def load(self) -> Tuple[Any, Mapping[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class ModuleLoRA:
    """One module's adapter: h = x @ a.T (a [r, K]); y += scaling * h @ b.T (b [N, r]).

    ``kind``: "linear" (nn.Linear / Conv1D), "embedding" (nn.Embedding: a = lora_embedding_A
    [r, num_embeddings], b = lora_embedding_B [embedding_dim, r]; x is the one-hot token, so
    h = a[:, token]) or "param" (PEFT's ``target_parameters``: LoRA on a module's nn.Parameter;
    for a 3-D [experts, ...] parameter ``experts`` = E and a is [E, r, K], b [E, N, r], one
    adapter per expert). ``magnitude``: DoRA's magnitude vector [N] (None: plain LoRA).
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    kind: str = "linear"
    magnitude: Optional[torch.Tensor] = None
    experts: int = 0

    @property
    def rank(self) -> int:
        return self.a.shape[-2]

    @property
    def nbytes(self) -> int:
        n = self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()
        if self.magnitude is not None:
            n += self.magnitude.numel() * self.magnitude.element_size()
        return n


@dataclass(frozen=True)
class AdapterWeights:
    """A parsed adapter: per-module weights keyed by module name as PEFT saw the model.

    ``base_copies``: copies of base-model parameters PEFT saved next to the LoRA weights (it saves
    the embedding / lm_head weights of adapters that target them), keyed by parameter name. They
    must equal the model's own parameters (checked when the adapter is bound to a model).
    """

    modules: Dict[str, ModuleLoRA]
    config: Dict[str, Any]
    origin: str  # where it came from, for messages
    base_copies: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)


@dataclass(frozen=True)
class Expectation:
    """What a model can accept, checked against a weights file's header before its data is read.

    ``check(origin, {state-dict key: shape})`` raises to refuse (its exception propagates);
    ``max_bytes``: a weights file (safetensors data or .bin) larger than this is refused unread.
    For custom sources, whose tensors arrive in memory, both apply to the returned tensors (their
    total bytes for ``max_bytes``) before they are parsed.
    """

    check: Optional[Callable[[str, Dict[str, Tuple[int, ...]]], None]] = None
    max_bytes: Optional[int] = None

    def __post_init__(self):
        if self.check is not None and not callable(self.check):
            raise TypeError(f"check: expected a callable, got {type(self.check).__name__}")
        if self.max_bytes is not None and (isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int)
                                           or self.max_bytes < 0):
            raise ValueError(f"max_bytes: expected None or an int >= 0, got {self.max_bytes!r}")


def _expect_size(expect: Optional[Expectation], origin: str, nbytes: int, what: str) -> None:
    if expect is not None and expect.max_bytes is not None and nbytes > expect.max_bytes:
        raise ValueError(f"{origin}: {what} of {nbytes} bytes, above the model's limit of max_bytes="
                         f"{expect.max_bytes}")


def _expect_shapes(expect: Optional[Expectation], origin: str, shapes: Dict[str, Tuple[int, ...]]) -> None:
    if expect is not None and expect.check is not None:
        expect.check(origin, shapes)


# ------------------------------------------------------------------------------------ sources


class LocalSource:
    """A PEFT adapter directory on local disk."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.fspath(path)

    def load(self, expect: Optional[Expectation] = None):
        return read_adapter_dir(self.path, expect)

    def __repr__(self) -> str:
        return f"LocalSource({self.path!r})"


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")


def _check_hub_name(arg: str, value: Any, repo_id: bool = False) -> None:
    """``repo_id`` / ``revision`` are names huggingface_hub joins into cache paths: no path tricks."""
    if not isinstance(value, str):
        raise TypeError(f"{arg}: expected a str, got {type(value).__name__}")
    parts = value.split("/")
    why = ("is empty" if not value else
           "contains a NUL character" if "\0" in value else
           "contains a backslash" if "\\" in value else
           "is an absolute path" if value.startswith("/") or os.path.isabs(value) else
           "has a '.' or '..' path component" if any(p in (".", "..") for p in parts) else
           "has an empty path component" if "" in parts else
           "is not 'name' or 'org/name' (letters, digits, '_', '-', '.')"
           if repo_id and not _HUB_ID.fullmatch(value) else None)
    if why:
        raise ValueError(f"{arg}: {value!r} {why}")


class HubSource:
    """A PEFT adapter in a Hugging Face Hub repo, fetched with huggingface_hub.

    The local cache is used first; with ``HF_HUB_OFFLINE=1`` (read when loading, not at import)
    or ``local_files_only=True`` nothing is downloaded. ``cache_dir`` defaults to
    ``$HF_HUB_CACHE`` or huggingface_hub's default. ``repo_id`` and ``revision`` are checked here
    (ValueError: no path components that leave the cache), and the snapshot directory must
    resolve to a place inside the cache. Once resolved, later re-reads use that directory.
    """

    def __init__(self, repo_id: str, *, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                 local_files_only: bool = False, token: Optional[str] = None):
        _check_hub_name("repo_id", repo_id, repo_id=True)
        if revision is not None:
            _check_hub_name("revision", revision)
        self.repo_id, self.revision, self.cache_dir = repo_id, revision, cache_dir
        self.local_files_only, self.token = local_files_only, token
        self._snapshot: Optional[str] = None

    def snapshot_dir(self) -> str:
        if self._snapshot is None:
            try:
                import huggingface_hub
                from huggingface_hub import constants
            except ImportError as e:  # pragma: no cover - it is a dependency of transformers
                raise ImportError(f"source {self.repo_id!r}: loading from the Hub needs huggingface_hub") from e
            offline = self.local_files_only or _env_flag("HF_HUB_OFFLINE")
            cache_dir = os.fspath(self.cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
            at = f" at revision {self.revision!r}" if self.revision else ""
            try:
                snap = huggingface_hub.snapshot_download(
                    self.repo_id, revision=self.revision, cache_dir=cache_dir, local_files_only=offline,
                    token=self.token, allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME])
            except Exception as e:
                where = "in the local Hub cache (offline)" if offline else "on the Hub or in the local cache"
                raise FileNotFoundError(
                    f"source {self.repo_id!r}: not a local directory, and no adapter found {where}{at}: {e}") from e
            real, root = os.path.realpath(snap), os.path.realpath(cache_dir)
            if real == root or os.path.commonpath([real, root]) != root:
                raise ValueError(f"source {self.repo_id!r}{at}: huggingface_hub returned the snapshot directory "
                                 f"{snap!r}, which resolves to {real!r}, outside the cache directory {root!r}")
            self._snapshot = real
        return self._snapshot

    def load(self, expect: Optional[Expectation] = None):
        return read_adapter_dir(self.snapshot_dir(), expect)

    def __repr__(self) -> str:
        return f"HubSource({self.repo_id!r}{f', revision={self.revision!r}' if self.revision else ''})"


class CallableSource:
    """Wraps a callable returning ``(config, tensors)``."""

    def __init__(self, fn: Callable[[], Tuple[Any, Mapping[str, torch.Tensor]]]):
        self.fn = fn

    def load(self):
        return self.fn()

    def __repr__(self) -> str:
        return f"CallableSource({getattr(self.fn, '__qualname__', repr(self.fn))})"


def resolve_source(source: Any) -> AdapterSource:
    """Turn what a user passed to ``load_adapter`` into an :class:`AdapterSource`.

    A string naming an existing directory is a local adapter; a string that is not a directory
    but looks like ``org/name`` is a Hub repo id; anything else that looks like a path raises
    FileNotFoundError naming it.
    """
    if isinstance(source, (LocalSource, HubSource, CallableSource)):
        return source
    if isinstance(source, os.PathLike):
        path = os.fspath(source)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"source: adapter directory {path!r} does not exist")
        return LocalSource(path)
    if isinstance(source, str):
        if not source:
            raise ValueError("source: empty string; give an adapter directory or a Hub repo id")
        if os.path.isdir(source):
            return LocalSource(source)
        if os.path.exists(source):
            raise ValueError(f"source: {source!r} is a file; give the adapter's directory "
                             f"(holding {CONFIG_NAME} and {SAFETENSORS_NAME})")
        if _HUB_ID.fullmatch(source):
            return HubSource(source)
        raise FileNotFoundError(f"source: adapter directory {source!r} does not exist")
    if isinstance(source, AdapterSource):
        return source
    if callable(source):
        return CallableSource(source)
    raise TypeError(f"source: expected a directory, a Hub repo id, an object with load() or a callable, "
                    f"got {type(source).__name__}")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# -------------------------------------------------------------------------------------- files


def _open_regular(path: str) -> Tuple[BinaryIO, int]:
    """``path`` opened for reading and its size; refused unless a non-empty regular file.

    Opened non-blocking (a FIFO would block a plain open) and checked with fstat on the open
    file, so what is read is what was checked. Symlinks to regular files are followed.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if isinstance(e, FileNotFoundError) and not os.path.lexists(path):
            raise FileNotFoundError(f"{path}: missing") from e
        raise AdapterFormatError(f"{path}: cannot be opened ({e.strerror or e})") from e
    try:
        st = os.fstat(fd)
        mode, size = st.st_mode, st.st_size
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                    "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a special file")
            raise AdapterFormatError(f"{path}: {kind}, not a regular file")
        if size == 0:
            raise AdapterFormatError(f"{path}: empty file (0 bytes; special files like /proc/self/mem report 0 too)")
        return os.fdopen(fd, "rb"), size
    except BaseException:
        os.close(fd)
        raise


def _read_at(f: BinaryIO, offset: int, n: int, path: str, what: str) -> bytearray:
    """Exactly ``n`` bytes at ``offset`` (plain seek / readinto; OSError -> AdapterFormatError)."""
    buf, got = bytearray(n), 0
    try:
        f.seek(offset)
        with memoryview(buf) as view:
            while got < n:
                k = f.readinto(view[got:])
                if not k:
                    break
                got += k
    except OSError as e:
        raise AdapterFormatError(f"{path}: cannot be read ({e.strerror or e})") from e
    if got < n:
        raise AdapterFormatError(f"{path}: truncated: {what} needs {n} bytes at offset {offset}, "
                                 f"only {got} could be read (the file changed?)")
    return buf


def read_config(path: str) -> Dict[str, Any]:
    """Read and decode an ``adapter_config.json`` (a JSON object, at most MAX_CONFIG_BYTES)."""
    f, size = _open_regular(path)
    with f:
        if size > MAX_CONFIG_BYTES:
            raise AdapterFormatError(f"{path}: {size} bytes, above the limit of {MAX_CONFIG_BYTES} bytes "
                                     "for an adapter config")
        data = _read_at(f, 0, size, path, "the config")
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AdapterFormatError(f"{path}: not valid JSON (not UTF-8 text: {e})") from None
    except RecursionError:
        raise AdapterFormatError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:          # JSONDecodeError, integers with too many digits
        raise AdapterFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def read_adapter_dir(path: Union[str, os.PathLike], expect: Optional[Expectation] = None,
                     ) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Read ``adapter_config.json`` and the weights of a PEFT adapter directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"source: adapter directory {path!r} does not exist")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.lexists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; {path!r} is not a PEFT adapter directory")
    config = read_config(cfg_path)
    st_path, bin_path = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.lexists(st_path):
        return config, read_safetensors(st_path, expect)
    if os.path.lexists(bin_path):
        return config, read_bin(bin_path, expect)
    raise FileNotFoundError(f"{st_path}: missing (and no {BIN_NAME} either) in adapter directory {path!r}")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _safetensors_header(f: BinaryIO, size: int, path: str, expect: Optional[Expectation]):
    """The checked header: ({name: (dtype, shape, begin, end)} in data order, data start)."""
    if size < 8:
        raise AdapterFormatError(f"{path}: truncated safetensors file ({size} bytes, less than the 8-byte "
                                 "header length)")
    n = int.from_bytes(_read_at(f, 0, 8, path, "the header length"), "little")
    if n > MAX_HEADER_BYTES:
        raise AdapterFormatError(f"{path}: corrupt safetensors file: a header of {n} bytes, above the limit of "
                                 f"{MAX_HEADER_BYTES}")
    if 8 + n > size:
        raise AdapterFormatError(f"{path}: truncated or corrupt safetensors file: a header of {n} bytes, "
                                 f"but the file has {size - 8} after the header length")
    data = size - 8 - n
    _expect_size(expect, path, data, "safetensors data")
    try:
        header = json.loads(_read_at(f, 8, n, path, "the header").decode("utf-8"))
    except (ValueError, RecursionError) as e:     # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise AdapterFormatError(f"{path}: corrupt safetensors file: the header is not UTF-8 JSON "
                                 f"({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: corrupt safetensors header: expected a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise AdapterFormatError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    entries = {}
    for name, info in header.items():
        bad = lambda why, name=name: AdapterFormatError(  # noqa: E731
            f"{path}: corrupt safetensors header: tensor {_show(name)}: {why}")
        if not isinstance(info, dict):
            raise bad("expected an object with dtype, shape and data_offsets")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise bad(f"unknown dtype {_show(dtype)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"shape {_show(shape)} is not a list of integers >= 0")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_count(o) for o in offs) and offs[0] <= offs[1]):
            raise bad(f"data_offsets {_show(offs)} is not [begin, end] with 0 <= begin <= end")
        begin, end = offs
        if end > data:
            raise AdapterFormatError(f"{path}: truncated safetensors file: tensor {_show(name)} ends at byte {end} "
                                     f"of the data, but the file holds {data} bytes of data")
        t = _ST_DTYPES[dtype]
        numel = 0 if 0 in shape else 1
        for d in shape:                    # stops early: huge dims in a corrupt header cost nothing
            numel *= d
            if numel * t.itemsize > end - begin:
                break
        if numel * t.itemsize != end - begin:
            raise bad(f"shape {_show(shape)} of {dtype} does not take the {end - begin} bytes of data_offsets {offs}")
        entries[name] = (t, tuple(shape), begin, end)
    entries = dict(sorted(entries.items(), key=lambda kv: kv[1][2:]))
    pos = 0
    for name, (_, _, begin, end) in entries.items():
        if begin != pos:
            raise AdapterFormatError(
                f"{path}: corrupt safetensors header: tensor {_show(name)} starts at byte {begin} of the data, "
                f"{'overlapping another tensor' if begin < pos else f'leaving a gap after byte {pos}'}")
        pos = end
    if pos != data:
        raise AdapterFormatError(f"{path}: corrupt safetensors file: {data - pos} bytes of data after the last tensor")
    return entries, 8 + n


def read_safetensors(path: str, expect: Optional[Expectation] = None) -> Dict[str, torch.Tensor]:
    """Read a safetensors file: the header, checked and then given to ``expect``; then each
    tensor's bytes, with plain reads into memory of its own (no mmap)."""
    f, size = _open_regular(path)
    with f:
        entries, start = _safetensors_header(f, size, path, expect)
        _expect_shapes(expect, path, {name: shape for name, (_, shape, _, _) in entries.items()})
        out = {}
        for name, (dtype, shape, begin, end) in entries.items():
            if end == begin:
                out[name] = torch.empty(shape, dtype=dtype)
            else:
                buf = _read_at(f, start + begin, end - begin, path, f"tensor {_show(name)}")
                out[name] = torch.frombuffer(buf, dtype=dtype).view(shape)
    return out


def read_bin(path: str, expect: Optional[Expectation] = None) -> Dict[str, torch.Tensor]:
    """A pickled state dict, read with weights_only=True: tensors and containers only."""
    f, size = _open_regular(path)
    with f:
        _expect_size(expect, path, size, "weights file")
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, OSError...
            raise AdapterFormatError(f"{path}: cannot be read as a tensors-only state dict "
                                     f"(torch.load(weights_only=True) refused it: {e})") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise AdapterFormatError(f"{path}: expected a dict of tensors")
    _expect_shapes(expect, path, {k: tuple(v.shape) for k, v in obj.items()})
    return dict(obj)


# ------------------------------------------------------------------------------------- config


def _config_dict(config: Any, origin: str) -> Dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise TypeError(f"{origin}: config must be a dict (adapter_config.json contents) or a peft.LoraConfig, "
                    f"got {type(config).__name__}")


def _is_set(value: Any) -> bool:
    return value not in (None, False, "", [], {}, ())


def _rank(v: Any, origin: str, name: str) -> int:
    """A rank: a positive int, or a float with an integral value (8.0)."""
    ok = not isinstance(v, bool) and (
        (isinstance(v, numbers.Integral) and v > 0) or
        (isinstance(v, numbers.Real) and math.isfinite(v) and float(v).is_integer() and v > 0))
    if not ok:
        raise AdapterFormatError(f"{origin}: adapter_config {name} must be a positive integer, got {_show(v)}")
    return int(v)


def _alpha(v: Any, origin: str, name: str) -> float:
    """An alpha: a finite number > 0."""
    try:
        ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v) and v > 0
    except OverflowError:          # an int too large for a float
        ok = False
    if not ok:
        raise AdapterFormatError(f"{origin}: adapter_config {name} must be a finite number > 0, got {_show(v)}")
    return float(v)


def check_config(config: Dict[str, Any], origin: str, params: bool = False) -> None:
    """Raise NotImplementedError for what this library does not apply, AdapterFormatError
    (naming the field and the value) for nonsense. ``params``: ``target_parameters`` can be
    resolved (a model is known: see :func:`parse_adapter`)."""
    peft_type = config.get("peft_type", "LORA")
    peft_type = getattr(peft_type, "value", peft_type)           # peft.PeftType is a str enum
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise NotImplementedError(f"{origin}: peft_type {_show(peft_type)} is not supported (only LoRA)")
    bad = [f"{k} ({why})" for k, why in _UNSUPPORTED_FIELDS.items() if _is_set(config.get(k))]
    targets = config.get("target_parameters")
    if _is_set(targets):
        if not params:
            bad.append("target_parameters (LoRA on nn.Parameter targets: needs the model, load it with "
                       "MultiLoRAModel.load_adapter)")
        elif not (isinstance(targets, (list, tuple)) and all(isinstance(t, str) and t for t in targets)):
            raise AdapterFormatError(f"{origin}: adapter_config target_parameters must be a list of parameter "
                                     f"names, got {_show(targets)}")
    if _is_set(config.get("use_dora")) and _is_set(targets):
        bad.append("use_dora with target_parameters (PEFT has no DoRA for parameter targets)")
    if config.get("bias", "none") != "none":
        bad.append(f"bias={_show(config.get('bias'))} (trained biases of the base layers)")
    if bad:
        raise NotImplementedError(f"{origin}: unsupported adapter_config fields: {', '.join(bad)}")
    _rank(config.get("r", 8), origin, "r")
    _alpha(config.get("lora_alpha", 8), origin, "lora_alpha")
    for key, value_check in (("rank_pattern", _rank), ("alpha_pattern", _alpha)):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, Mapping):
            raise AdapterFormatError(f"{origin}: adapter_config {key} must be a mapping, got {type(patterns).__name__}")
        for k, v in patterns.items():
            if not isinstance(k, str):
                raise AdapterFormatError(f"{origin}: adapter_config {key}: key {_show(k)} is not a string")
            try:
                compile_pattern(k, peft_suffix=True)
            except PatternError as e:
                raise AdapterFormatError(f"{origin}: adapter_config {key}[{_show(k)}]: {e}") from None
            value_check(v, origin, f"{key}[{_show(k)}]")


def _pattern_value(patterns: Optional[Mapping[str, Any]], module: str, default: Any) -> Tuple[Optional[str], Any]:
    """PEFT's rule: the first pattern key that matches the end of the module name (after a dot);
    (that key, its value), or (None, default)."""
    for key, value in (patterns or {}).items():
        if peft_key_matches(key, module):
            return key, value
    return None, default


def module_scaling(config: Dict[str, Any], module: str, origin: str = "adapter") -> Tuple[int, float]:
    """(rank the config gives ``module``, PEFT's scaling for it: alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    key, r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    r = _rank(r, origin, "r" if key is None else f"rank_pattern[{_show(key)}]")
    key, alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    alpha = _alpha(alpha, origin, "lora_alpha" if key is None else f"alpha_pattern[{_show(key)}]")
    scale = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return r, scale


# ------------------------------------------------------------------------------------ tensors


LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def split_key(key: str) -> Optional[Tuple[str, str]]:
    """``(module, part)`` for a LoRA tensor's state-dict key (``base_model.model.`` prefix
    stripped, an adapter-name infix like ``.default`` allowed), part one of :data:`LORA_PARTS`
    ("lora_A" / "lora_B" of a linear layer or wrapped parameter, "lora_embedding_A" /
    "lora_embedding_B" of an nn.Embedding, DoRA's "lora_magnitude_vector"); None for a saved copy
    of a base parameter; NotImplementedError for LoRA tensors this library does not apply."""
    name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
    for rx in (_KEY, _EMB_KEY):
        m = rx.match(name)
        if m is not None:
            return m.group("module"), m.group("part")
    m = _MAG_KEY.match(name)
    if m is not None:
        return m.group("module"), "lora_magnitude_vector"
    if "lora_" in name:
        what = "a lora_B bias" if name.endswith("lora_B.bias") else "an unknown LoRA tensor"
        raise NotImplementedError(f"tensor {key!r} is unsupported ({what})")
    return None


def strip_base_layer(module: str) -> Tuple[str, int]:
    """(module name without PEFT's trailing ``.base_layer`` wrappers, how many there were). PEFT
    nests one ParamWrapper per targeted parameter of a module: the LoRA of the last targeted
    parameter is saved under ``experts.lora_A``, the one before under ``experts.base_layer.lora_A``."""
    depth = 0
    while module.endswith(".base_layer"):
        module, depth = module[:-len(".base_layer")], depth + 1
    return module, depth


# (adapter module name with its .base_layer wrappers, config) -> (parameter key, experts) or None
ParamResolver = Callable[[str, Dict[str, Any]], Optional[Tuple[str, int]]]


def _check_tensors(tensors: Any, origin: str) -> None:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{origin}: tensors must be a mapping of state-dict keys to tensors, got {type(tensors).__name__}")
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise AdapterFormatError(f"{origin}: state-dict entry {_show(key)} is not a string key with a tensor")
        if t.is_meta:
            raise AdapterFormatError(f"{origin}: tensor {key!r} is on the meta device (a shape without data)")
        if t.layout != torch.strided or t.is_nested:
            raise AdapterFormatError(f"{origin}: tensor {key!r} has layout {t.layout}"
                                     f"{' (nested)' if t.is_nested else ''}; only dense (strided) tensors are accepted")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))


def parse_adapter(config: Any, tensors: Mapping[str, torch.Tensor], origin: str,
                  params: Optional[ParamResolver] = None) -> AdapterWeights:
    """Validate a config + state dict and group the tensors per module.

    ``params`` resolves PEFT's ``target_parameters`` (it needs the model: which parameters of a
    module were wrapped, in which order, and how many experts a 3-D one holds); without it an
    adapter using them is refused with NotImplementedError. A wrapped parameter's LoRA is keyed by
    the parameter (``...experts.gate_up_proj``); a 3-D one is split per expert as PEFT does
    (lora_A [E*r, K] -> [E, r, K]; lora_B [N, E*r] with column j*E + e -> [E, N, r]).
    """
    cfg = _config_dict(config, origin)
    check_config(cfg, origin, params=params is not None)
    _check_tensors(tensors, origin)
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    base_copies: Dict[str, torch.Tensor] = {}
    first: Dict[Tuple[str, str], str] = {}        # what a key names -> the first key naming it
    for key, t in tensors.items():
        try:
            hit = split_key(key)
        except NotImplementedError as e:
            raise NotImplementedError(f"{origin}: {e}") from None
        if hit is None:   # a saved copy of a base parameter (PEFT saves embeddings / lm_head it wrapped)
            name = (key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key).replace(".base_layer.", ".")
            what, dest, slot = ("", name), base_copies, name
        else:
            what, dest, slot = hit, parts.setdefault(hit[0], {}), hit[1]
        if what in first:
            if not _same(tensors[first[what]], t):
                raise AdapterFormatError(
                    f"{origin}: tensors {first[what]!r} and {key!r} name the same "
                    f"{'base parameter' if hit is None else f'{hit[1]} of module {hit[0]!r}'} with different values")
            continue
        first[what] = key
        dest[slot] = t
    if not any("lora_A" in ab or "lora_embedding_A" in ab or "lora_B" in ab or "lora_embedding_B" in ab
               for ab in parts.values()):
        raise AdapterFormatError(f"{origin}: no lora_A / lora_B weights found")
    dora = _is_set(cfg.get("use_dora"))
    use_params = params is not None and _is_set(cfg.get("target_parameters"))
    modules: Dict[str, ModuleLoRA] = {}
    for mod, ab in sorted(parts.items()):
        emb = "lora_embedding_A" in ab or "lora_embedding_B" in ab
        if emb and ("lora_A" in ab or "lora_B" in ab):
            raise AdapterFormatError(f"{origin}: module {mod!r} has both lora_A/lora_B and lora_embedding_A/B")
        na, nb = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        if na not in ab or nb not in ab:
            missing = nb if na in ab else na
            raise AdapterFormatError(f"{origin}: module {mod!r} has no {missing}{'' if emb else '.weight'}")
        a, b, mag = ab[na], ab[nb], ab.get("lora_magnitude_vector")
        if a.dim() != 2 or b.dim() != 2:
            raise NotImplementedError(f"{origin}: module {mod!r} has {na} {tuple(a.shape)} / {nb} {tuple(b.shape)}; "
                                      "only linear layers, embeddings and parameters (2-D LoRA weights) are supported")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterFormatError(f"{origin}: module {mod!r}: LoRA weights must be floating point, got {a.dtype}/{b.dtype}")
        if b.shape[1] != a.shape[0]:
            raise AdapterFormatError(f"{origin}: module {mod!r}: {na} {tuple(a.shape)} and {nb} {tuple(b.shape)} "
                                     "disagree on the rank")
        target = params(mod, cfg) if use_params and not emb else None
        name, kind, experts = (mod, "embedding" if emb else "linear", 0) if target is None else (
            target[0], "param", target[1])
        r_cfg, scale = module_scaling(cfg, name, origin)
        rows = r_cfg * max(experts, 1)
        if rows != a.shape[0]:
            raise AdapterFormatError(f"{origin}: module {mod!r}: adapter_config gives rank {r_cfg} (r / rank_pattern)"
                                     f"{f' x {experts} experts' if experts else ''} but {na} has {a.shape[0]} rows")
        if experts:           # PEFT's ParamWrapper.get_delta_factors
            a = a.reshape(experts, r_cfg, a.shape[-1])
            b = b.reshape(b.shape[0], r_cfg, experts).permute(2, 0, 1)
        if mag is not None or dora:
            if kind == "param":
                raise NotImplementedError(f"{origin}: module {mod!r}: DoRA on a parameter target is not supported")
            if mag is None:
                raise AdapterFormatError(f"{origin}: module {mod!r} has no lora_magnitude_vector, but the config "
                                         "sets use_dora")
            if not dora:
                raise AdapterFormatError(f"{origin}: module {mod!r} has a lora_magnitude_vector, but the config does "
                                         "not set use_dora")
            if mag.dim() != 1 or mag.shape[0] != b.shape[0] or not mag.is_floating_point():
                raise AdapterFormatError(f"{origin}: module {mod!r}: lora_magnitude_vector {tuple(mag.shape)} "
                                         f"{mag.dtype}, expected a float vector of {b.shape[0]} (the output features)")
        if name in modules:
            raise AdapterFormatError(f"{origin}: modules {mod!r} and another one name the same target {name!r}")
        modules[name] = ModuleLoRA(a, b, scale, kind, mag, experts)
    return AdapterWeights(modules, cfg, origin, base_copies)


def _describe(obj: Any) -> str:
    if obj is None:
        return "None"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def load_adapter_weights(source: AdapterSource, expect: Optional[Expectation] = None,
                         params: Optional[ParamResolver] = None) -> AdapterWeights:
    """Read and parse one adapter from a source (errors name the source and the problem).

    LocalSource / HubSource get ``expect`` (checked on the weights file's header, before its data
    is read); other sources keep their ``load()`` protocol and ``expect`` is applied to the
    tensors they return, before parsing. ``params``: see :func:`parse_adapter`.
    """
    origin = repr(source)
    builtin = isinstance(source, (LocalSource, HubSource))
    got = source.load(expect=expect) if builtin else source.load()
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise AdapterFormatError(f"{origin}: load() must return a (config, tensors) pair, got {_describe(got)}")
    config, tensors = got
    if expect is not None and not builtin:
        _check_tensors(tensors, origin)
        _expect_size(expect, origin, sum(t.numel() * t.element_size() for t in tensors.values()), "tensors")
        _expect_shapes(expect, origin, {k: tuple(t.shape) for k, t in tensors.items()})
    return parse_adapter(config, tensors, origin, params)
