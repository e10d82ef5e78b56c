"""PEFT LoRA adapters: where they come from, how they are read, and what is accepted.

An adapter is what PEFT's ``save_pretrained`` writes: ``adapter_config.json`` plus
``adapter_model.safetensors`` (or, from old PEFT versions, ``adapter_model.bin``). This module
turns such an adapter into :class:`AdapterWeights`: for every module it targets, ``lora_A.weight``
[r, K], ``lora_B.weight`` [N, r] and PEFT's scaling for that module. It never touches a model;
matching the modules to a model is the job of ``hf_patch.py``.

Sources (``resolve_source``):
  * a local directory (``str`` or ``os.PathLike``);
  * a Hugging Face Hub repo id ``"org/name"`` (through huggingface_hub: the local cache first,
    ``HF_HUB_OFFLINE=1`` honoured at call time; :class:`HubSource` takes a revision / cache dir);
  * anything with a ``load()`` method, or a plain callable, returning ``(config, tensors)``:
    ``config`` the adapter_config.json contents (a dict, or a ``peft.LoraConfig``) and
    ``tensors`` a mapping of PEFT state-dict keys to tensors. Registries and object stores plug
    in there (see :class:`AdapterSource`).

The config fields that decide the output are honoured: ``r``, ``lora_alpha``, ``use_rslora``
(scaling alpha / sqrt(r) instead of alpha / r), ``rank_pattern`` and ``alpha_pattern`` (per-module
rank and alpha, matched like PEFT does: the key is a suffix regex of the module name).
``target_modules`` (list, regex or "all-linear"), ``layers_to_transform``/``layers_pattern`` and
``fan_in_fan_out`` decide which modules PEFT created and saved; the saved tensors are the
authority on that, so an adapter applies exactly to the modules it has weights for. Fields that
change the computation in ways these kernels do not implement (DoRA, LoRA bias, modules_to_save,
trainable tokens, ...) raise NotImplementedError naming them, never silently wrong output.

Weights are never unpickled: a ``.bin`` file is read with ``torch.load(weights_only=True)``, which
accepts tensors only. Safetensors files are read fully into memory (no mmap), so a file changed
or truncated later cannot crash the process. Every read error names the file.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple, Union, runtime_checkable

import torch

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

# Config fields whose "set" value changes the forward pass in a way plain LoRA does not cover.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained copies of whole modules",
    "trainable_token_indices": "trained token embeddings",
    "layer_replication": "replicated layers",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "target_parameters": "LoRA on parameters (nn.Parameter targets)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
}
_PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


class AdapterFormatError(ValueError):
    """An adapter's files or tensors are malformed (the message names the file or key)."""


@runtime_checkable
class AdapterSource(Protocol):
    """A custom place adapters come from (registry, object store, database...).

    ``load()`` returns ``(config, tensors)``: the adapter_config.json contents (dict or
    ``peft.LoraConfig``) and a mapping of PEFT state-dict keys (``...q_proj.lora_A.weight``, with
    or without the ``base_model.model.`` prefix) to tensors. It may be called again later: the
    adapter pool drops adapters from host memory past its budget and re-reads them on demand.
    """

    def load(self) -> Tuple[Any, Mapping[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class ModuleLoRA:
    """One module's adapter: h = x @ a.T (a [r, K]); y += scaling * h @ b.T (b [N, r])."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


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


# ------------------------------------------------------------------------------------ sources


class LocalSource:
    """A PEFT adapter directory on local disk."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.fspath(path)

    def load(self):
        return read_adapter_dir(self.path)

    def __repr__(self) -> str:
        return f"LocalSource({self.path!r})"


class HubSource:
    """A PEFT adapter in a Hugging Face Hub repo, fetched with huggingface_hub.

    The local cache is used first; with ``HF_HUB_OFFLINE=1`` (read when loading, not at import)
    or ``local_files_only=True`` nothing is downloaded. ``cache_dir`` defaults to
    ``$HF_HUB_CACHE`` or huggingface_hub's default. Once resolved, later re-reads use the
    downloaded snapshot directory.
    """

    def __init__(self, repo_id: str, *, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                 local_files_only: bool = False, token: Optional[str] = None):
        self.repo_id, self.revision, self.cache_dir = repo_id, revision, cache_dir
        self.local_files_only, self.token = local_files_only, token
        self._snapshot: Optional[str] = None

    def snapshot_dir(self) -> str:
        if self._snapshot is None:
            try:
                import huggingface_hub
            except ImportError as e:  # pragma: no cover - it is a dependency of transformers
                raise ImportError(f"source {self.repo_id!r}: loading from the Hub needs huggingface_hub") from e
            offline = self.local_files_only or _env_flag("HF_HUB_OFFLINE")
            cache_dir = self.cache_dir or os.environ.get("HF_HUB_CACHE") or None
            try:
                self._snapshot = huggingface_hub.snapshot_download(
                    self.repo_id, revision=self.revision, cache_dir=cache_dir, local_files_only=offline,
                    token=self.token, allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME])
            except Exception as e:
                where = "in the local Hub cache (offline)" if offline else "on the Hub or in the local cache"
                raise FileNotFoundError(
                    f"source {self.repo_id!r}: not a local directory, and no adapter found {where}"
                    f"{f' at revision {self.revision!r}' if self.revision else ''}: {e}") from e
        return self._snapshot

    def load(self):
        return read_adapter_dir(self.snapshot_dir())

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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


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
        if _HUB_ID.match(source) and not source.startswith("."):
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


def read_adapter_dir(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Read ``adapter_config.json`` and the weights of a PEFT adapter directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"source: adapter directory {path!r} does not exist")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; {path!r} is not a PEFT adapter directory")
    try:
        with open(cfg_path, "r", encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    st_path, bin_path = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.isfile(st_path):
        return config, read_safetensors(st_path)
    if os.path.isfile(bin_path):
        return config, read_bin(bin_path)
    raise FileNotFoundError(f"{st_path}: missing (and no {BIN_NAME} either) in adapter directory {path!r}")


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    with open(path, "rb") as f:
        data = f.read()
    try:
        return dict(st_load(data))
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise AdapterFormatError(f"{path}: corrupt or truncated safetensors file ({e})") from e


def read_bin(path: str) -> Dict[str, torch.Tensor]:
    """A pickled state dict, read with weights_only=True: tensors and containers only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError...
        raise AdapterFormatError(f"{path}: cannot be read as a tensors-only state dict "
                                 f"(torch.load(weights_only=True) refused it: {e})") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise AdapterFormatError(f"{path}: expected a dict of tensors")
    return obj


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


def check_config(config: Dict[str, Any], origin: str) -> None:
    """Raise NotImplementedError for what this library does not apply, ValueError for nonsense."""
    peft_type = config.get("peft_type", "LORA")
    peft_type = str(getattr(peft_type, "value", peft_type))      # peft.PeftType is a str enum
    if peft_type.upper() != "LORA":
        raise NotImplementedError(f"{origin}: peft_type {peft_type!r} is not supported (only LoRA)")
    bad = [f"{k} ({why})" for k, why in _UNSUPPORTED_FIELDS.items() if _is_set(config.get(k))]
    if str(config.get("bias", "none")) != "none":
        bad.append(f"bias={config.get('bias')!r} (trained biases of the base layers)")
    if bad:
        raise NotImplementedError(f"{origin}: unsupported adapter_config fields: {', '.join(bad)}")
    for key in ("r", "lora_alpha"):
        v = config.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise AdapterFormatError(f"{origin}: adapter_config {key} must be a positive number, got {v!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        v = config.get(key)
        if v is not None and not isinstance(v, Mapping):
            raise AdapterFormatError(f"{origin}: adapter_config {key} must be a mapping, got {type(v).__name__}")


def _pattern_value(patterns: Optional[Mapping[str, Any]], module: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key that matches the end of the module name (after a dot)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scaling(config: Dict[str, Any], module: str) -> Tuple[int, float]:
    """(rank the config gives ``module``, PEFT's scaling for it: alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    r = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return r, scale


# ------------------------------------------------------------------------------------ tensors


def parse_adapter(config: Any, tensors: Mapping[str, torch.Tensor], origin: str) -> AdapterWeights:
    """Validate a config + state dict and group the tensors per module."""
    cfg = _config_dict(config, origin)
    check_config(cfg, origin)
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{origin}: tensors must be a mapping of state-dict keys to tensors, got {type(tensors).__name__}")
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    base_copies: Dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise AdapterFormatError(f"{origin}: state-dict entry {key!r} is not a string key with a tensor")
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        m = _KEY.match(name)
        if m is not None:
            parts.setdefault(m.group("module"), {})[m.group("part")] = t
        elif "lora_" in name:
            what = ("DoRA magnitude vector" if "lora_magnitude_vector" in name else
                    "embedding LoRA" if "lora_embedding_" in name else
                    "a lora_B bias" if name.endswith("lora_B.bias") else "an unknown LoRA tensor")
            raise NotImplementedError(f"{origin}: tensor {key!r} is unsupported ({what})")
        else:   # a saved copy of a base parameter (PEFT saves embeddings / lm_head it wrapped)
            base_copies[name.replace(".base_layer.", ".")] = t
    if not parts:
        raise AdapterFormatError(f"{origin}: no lora_A / lora_B weights found")
    modules: Dict[str, ModuleLoRA] = {}
    for mod, ab in sorted(parts.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise AdapterFormatError(f"{origin}: module {mod!r} has no {missing}.weight")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2:
            raise NotImplementedError(f"{origin}: module {mod!r} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}; "
                                      "only linear layers (2-D LoRA weights) are supported")
        if b.shape[1] != a.shape[0]:
            raise AdapterFormatError(f"{origin}: module {mod!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                     "disagree on the rank")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterFormatError(f"{origin}: module {mod!r}: LoRA weights must be floating point, got {a.dtype}/{b.dtype}")
        r_cfg, scale = module_scaling(cfg, mod)
        if r_cfg != a.shape[0]:
            raise AdapterFormatError(f"{origin}: module {mod!r}: adapter_config gives rank {r_cfg} "
                                     f"(r / rank_pattern) but lora_A has {a.shape[0]} rows")
        modules[mod] = ModuleLoRA(a, b, scale)
    return AdapterWeights(modules, cfg, origin, base_copies)


def load_adapter_weights(source: AdapterSource) -> AdapterWeights:
    """Read and parse one adapter from a source (errors name the source and the problem)."""
    config, tensors = source.load()
    return parse_adapter(config, tensors, repr(source))
