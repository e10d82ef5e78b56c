"""Hostile or broken adapter input: config values, config files, custom sources, tensors, Hub
arguments, special files and oversized weights files. Each is a Python exception naming the field,
key or file; through a patched model nothing changes (the adapter loaded before answers
bit-identically, the bad name is not registered). Also: the safetensors reader against the
safetensors library, the Expectation hook and split_key."""
import contextlib
import copy
import json
import os
import re
import shutil
import signal
import struct
import time

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels import adapters as ad
from openlora_kernels.adapters import (AdapterFormatError, Expectation, HubSource, LocalSource, load_adapter_weights,
                                       module_scaling, read_adapter_dir, read_bin, read_safetensors, split_key)

from hf_models import left_padded_batch, make_model, save_adapter

QA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
QB = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from peft import LoraConfig

    base = make_model("llama")
    root = tmp_path_factory.mktemp("inputs")
    good = save_adapter(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                        str(root / "good"), seed=1)
    return base, root, good


@pytest.fixture
def lm(env):
    base, root, good = env
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=16)
    lm.load_adapter("good", good)
    ids, mask = left_padded_batch([5, 3], seed=2)
    lm.reference = (ids, mask, lm(input_ids=ids, attention_mask=mask, adapter_names=["good", None]).logits)
    return lm


def assert_unchanged(lm):
    ids, mask, want = lm.reference
    assert lm.adapters == ("good",)
    got = lm(input_ids=ids, attention_mask=mask, adapter_names=["good", None]).logits
    assert torch.equal(got, want)


def answers_like_good(lm, name):
    """Adapter ``name`` holds the good adapter's weights: its rows give the reference logits."""
    ids, mask, want = lm.reference
    assert torch.equal(lm(input_ids=ids, attention_mask=mask, adapter_names=[name, None]).logits, want)


def copy_adapter(env, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(env[2], dst)
    return dst


def with_config(env, tmp_path, name="cfg", **changes):
    d = copy_adapter(env, tmp_path, name)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))       # NaN / Infinity literals for floats
    return d


def good_tensors(env):
    from safetensors.torch import load_file

    return load_file(os.path.join(env[2], "adapter_model.safetensors"))


def good_config(env):
    return json.loads(open(os.path.join(env[2], "adapter_config.json")).read())


@contextlib.contextmanager
def deadline(seconds):
    """Fail (instead of hanging the run) if the block blocks, e.g. opening a FIFO."""
    def boom(*_):
        raise TimeoutError(f"blocked for more than {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------ config values


@pytest.mark.parametrize("field,value,shown", [
    ("r", float("nan"), "nan"), ("r", float("inf"), "inf"), ("r", 4.5, "4.5"), ("r", True, "True"),
    ("r", "4", "'4'"), ("r", 0, "0"), ("r", -4, "-4"), ("r", None, "None"),
    ("lora_alpha", float("nan"), "nan"), ("lora_alpha", float("-inf"), "-inf"), ("lora_alpha", 0, "0"),
    ("lora_alpha", -8, "-8"), ("lora_alpha", False, "False"), ("lora_alpha", "8", "'8'"),
    ("lora_alpha", 10 ** 400, "1000"),
])
def test_bad_r_and_lora_alpha(lm, env, tmp_path, field, value, shown):
    d = with_config(env, tmp_path, **{field: value})
    with pytest.raises(AdapterFormatError,
                       match=rf"LocalSource.*cfg.*adapter_config {field} must be .*got {re.escape(shown)}"):
        lm.load_adapter("bad", str(d))
    assert_unchanged(lm)


def test_integral_float_rank_is_accepted(lm, env, tmp_path):
    lm.load_adapter("r4f", str(with_config(env, tmp_path, r=4.0, lora_alpha=8.0)))
    answers_like_good(lm, "r4f")


@pytest.mark.parametrize("field,value", [
    ("rank_pattern", 0), ("rank_pattern", 2.5), ("rank_pattern", float("nan")), ("rank_pattern", True),
    ("rank_pattern", "2"), ("rank_pattern", -2), ("rank_pattern", None),
    ("alpha_pattern", 0), ("alpha_pattern", -1.5), ("alpha_pattern", float("nan")), ("alpha_pattern", float("inf")),
    ("alpha_pattern", True), ("alpha_pattern", "16"), ("alpha_pattern", None),
])
def test_bad_pattern_values(lm, env, tmp_path, field, value):
    d = with_config(env, tmp_path, **{field: {"v_proj": value}})
    with pytest.raises(AdapterFormatError, match=rf"adapter_config {field}\['v_proj'\] must be"):
        lm.load_adapter("bad", str(d))
    assert_unchanged(lm)


@pytest.mark.parametrize("key,why", [
    ("(", "invalid regular expression"), (r"(q)\1", "backreferences"), ("(?=v)v_proj", "lookarounds"),
    ("(?i)V_PROJ", "inline flags"), ("v*+_proj", "possessive"), ("x" * 1001, "above the limit"),
    ("(v{100}){200}", "NFA states"),
], ids=lambda v: v[:20])
def test_bad_pattern_keys(lm, env, tmp_path, key, why):
    for field in ("rank_pattern", "alpha_pattern"):
        d = with_config(env, tmp_path, name=field, **{field: {key: 4}})
        with pytest.raises(AdapterFormatError, match=rf"adapter_config {field}\[{re.escape(repr(key)[:20])}.*{why}"):
            lm.load_adapter("bad", str(d))
        assert_unchanged(lm)


def test_non_string_pattern_key(lm, env):
    tensors = good_tensors(env)
    cfg = dict(good_config(env), rank_pattern={3: 4})
    with pytest.raises(AdapterFormatError, match=r"rank_pattern: key 3 is not a string"):
        lm.load_adapter("bad", lambda: (cfg, tensors))
    assert_unchanged(lm)


def test_backtracking_pattern_key_loads_fast(lm, env, tmp_path):
    """Python's re takes exponential time on this key against a module name (> 30 s)."""
    d = with_config(env, tmp_path, rank_pattern={"(.*.*)*X": 2}, alpha_pattern={"(a|a)*b": 3})
    t0 = time.perf_counter()
    lm.load_adapter("slowkey", str(d))
    assert time.perf_counter() - t0 < 2.0
    answers_like_good(lm, "slowkey")         # the keys match no module: r=4, alpha=8 as before


def test_pattern_values_follow_peft_rule():
    cfg = dict(r=4, lora_alpha=8, rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 6},
               alpha_pattern={"v_pr.*": 16.0, "nothing": 1})
    assert module_scaling(cfg, "model.layers.1.self_attn.q_proj") == (2, 4.0)   # first match wins
    assert module_scaling(cfg, "model.layers.0.self_attn.q_proj") == (6, 8 / 6)
    assert module_scaling(cfg, "model.layers.0.self_attn.v_proj") == (4, 4.0)   # alpha 16 / r 4
    assert module_scaling(cfg, "model.layers.0.self_attn.xv_proj") == (4, 2.0)  # a suffix only after a dot
    assert module_scaling(dict(cfg, use_rslora=True), "model.layers.0.self_attn.v_proj") == (4, 8.0)


# ------------------------------------------------------------------------- config files


@pytest.mark.parametrize("content,why", [
    (b"[" * 200000 + b"]" * 200000, "not valid JSON"),
    (b'{"r": 4, "lora_alpha": 8, "x": "\xff\xfe"}', "not UTF-8"),
    (b"hello", "not valid JSON"),
    (b'{"r": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b"", "empty file"),
])
def test_bad_config_files(lm, env, tmp_path, content, why):
    d = copy_adapter(env, tmp_path)
    (d / "adapter_config.json").write_bytes(content)
    with pytest.raises(AdapterFormatError, match=rf"adapter_config\.json: .*{why}"):
        lm.load_adapter("bad", str(d))
    assert_unchanged(lm)


def test_oversized_config_is_refused_unread(lm, env, tmp_path):
    d = copy_adapter(env, tmp_path)
    with open(d / "adapter_config.json", "r+b") as f:
        f.truncate(ad.MAX_CONFIG_BYTES + 1)               # sparse: no disk, and never read
    t0 = time.perf_counter()
    with pytest.raises(AdapterFormatError, match=rf"adapter_config\.json: {ad.MAX_CONFIG_BYTES + 1} bytes, above"):
        lm.load_adapter("big", str(d))
    assert time.perf_counter() - t0 < 1.0
    assert_unchanged(lm)


def test_config_symlinked_to_a_fifo(lm, env, tmp_path):
    d = copy_adapter(env, tmp_path)
    os.mkfifo(tmp_path / "fifo")
    os.remove(d / "adapter_config.json")
    os.symlink(tmp_path / "fifo", d / "adapter_config.json")
    with deadline(10), pytest.raises(AdapterFormatError, match=r"adapter_config\.json: a FIFO, not a regular file"):
        lm.load_adapter("fifo", str(d))
    assert_unchanged(lm)


# -------------------------------------------------------------------------------- sources


@pytest.mark.parametrize("returned,shown", [
    (None, "None"), ({"r": 4}, "a dict"), (("a", "b", "c"), "a tuple of 3 items"), ((), "a tuple of 0 items"),
    ("ab", "a str"), (iter([{}, {}]), "a list_iterator"),
])
def test_custom_source_returning_something_else(lm, returned, shown):
    class Store:
        def load(self):
            return returned

        def __repr__(self):
            return "Store('s3://bucket/x')"

    for src, name in ((lambda: returned, "CallableSource"), (Store(), r"Store\('s3://bucket/x'\)")):
        with pytest.raises(AdapterFormatError, match=rf"{name}.*load\(\) must return a \(config, tensors\) pair, "
                                                     rf"got {re.escape(shown)}"):
            lm.load_adapter("bad", src)
    assert_unchanged(lm)


def test_custom_source_returning_a_generator(lm, env):
    def gen():
        yield good_config(env)
        yield good_tensors(env)

    with pytest.raises(AdapterFormatError, match=r"pair, got a generator"):
        lm.load_adapter("bad", gen)
    assert_unchanged(lm)


def test_custom_source_returning_a_list_pair_is_accepted(lm, env):
    cfg, tensors = good_config(env), good_tensors(env)
    lm.load_adapter("listpair", lambda: [cfg, tensors])
    answers_like_good(lm, "listpair")


# -------------------------------------------------------------------------------- tensors


def test_meta_tensor(lm, env):
    tensors = good_tensors(env)
    tensors[QA] = torch.empty(tensors[QA].shape, device="meta")
    with pytest.raises(AdapterFormatError, match=rf"tensor {re.escape(repr(QA))} is on the meta device"):
        lm.load_adapter("meta", lambda: (good_config(env), tensors))
    assert_unchanged(lm)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("to_layout", [lambda t: t.to_sparse(), lambda t: t.to_sparse_csr()])
def test_sparse_tensor(lm, env, to_layout):
    tensors = good_tensors(env)
    tensors[QB] = to_layout(tensors[QB])
    with pytest.raises(AdapterFormatError, match=rf"tensor {re.escape(repr(QB))} has layout torch.sparse_"):
        lm.load_adapter("sparse", lambda: (good_config(env), tensors))
    assert_unchanged(lm)


@pytest.mark.parametrize("spell", [
    lambda k: k[len("base_model.model."):],                    # without the PEFT prefix
    lambda k: k.replace(".lora_A.weight", ".lora_A.default.weight"),
])
def test_one_module_under_two_spellings(lm, env, spell):
    tensors = good_tensors(env)
    other = spell(QA)
    differing = dict(tensors, **{other: tensors[QA] + 1})
    with pytest.raises(AdapterFormatError, match=rf"{re.escape(repr(QA))} and {re.escape(repr(other))} name the same "
                                                 r"lora_A of module 'model.layers.0.self_attn.q_proj' with different"):
        lm.load_adapter("dup", lambda: (good_config(env), differing))
    assert_unchanged(lm)
    same = dict(tensors, **{other: tensors[QA].clone()})
    lm.load_adapter("same", lambda: (good_config(env), same))   # identical values: one tensor
    answers_like_good(lm, "same")


def test_base_copy_under_two_spellings():
    a = torch.zeros(4, 8)
    tensors = {"model.layers.0.q_proj.lora_A.weight": a, "model.layers.0.q_proj.lora_B.weight": torch.zeros(8, 4),
               "base_model.model.lm_head.weight": torch.zeros(3, 8), "lm_head.base_layer.weight": torch.ones(3, 8)}
    with pytest.raises(AdapterFormatError, match=r"'base_model.model.lm_head.weight' and 'lm_head.base_layer.weight' "
                                                 r"name the same base parameter"):
        ad.parse_adapter({"r": 4}, tensors, "src")


def test_split_key():
    assert split_key(QA) == ("model.layers.0.self_attn.q_proj", "lora_A")
    assert split_key("model.layers.0.mlp.down_proj.lora_B.default.weight") == ("model.layers.0.mlp.down_proj", "lora_B")
    assert split_key("base_model.model.lm_head.base_layer.weight") is None
    assert split_key("model.embed_tokens.weight") is None
    assert split_key("model.q_proj.lora_magnitude_vector.default.weight") == ("model.q_proj", "lora_magnitude_vector")
    assert split_key("base_model.model.model.q_proj.lora_magnitude_vector") == ("model.q_proj", "lora_magnitude_vector")
    assert split_key("model.embed_tokens.lora_embedding_A.default") == ("model.embed_tokens", "lora_embedding_A")
    assert split_key("base_model.model.model.embed_tokens.lora_embedding_B") == ("model.embed_tokens",
                                                                                 "lora_embedding_B")
    assert split_key("model.layers.0.mlp.experts.base_layer.lora_A.weight") == ("model.layers.0.mlp.experts.base_layer",
                                                                                "lora_A")
    for key, what in (("model.q_proj.lora_B.bias", "a lora_B bias"),
                      ("model.q_proj.lora_E.weight", "an unknown LoRA tensor")):
        with pytest.raises(NotImplementedError, match=rf"{re.escape(repr(key))} is unsupported \({what}"):
            split_key(key)


# ------------------------------------------------------------------------------ Hub source

REPO = "tiny-org/llama-lora"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(cache, files_from):
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    root = os.path.join(cache, "models--" + REPO.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(COMMIT)
    shutil.copytree(files_from, os.path.join(root, "snapshots", COMMIT))


@pytest.mark.parametrize("arg,value,why", [
    ("revision", "../../../x", r"'\.' or '\.\.' path component"),
    ("revision", "refs/../../x", r"'\.' or '\.\.' path component"),
    ("revision", "./main", r"'\.' or '\.\.' path component"),
    ("revision", "/etc", "absolute path"),
    ("revision", "refs\\pr\\1", "backslash"),
    ("revision", "main\0", "NUL"),
    ("revision", "refs//pr", "empty path component"),
    ("revision", "", "is empty"),
    ("repo_id", "../x", r"'\.' or '\.\.' path component"),
    ("repo_id", "org/..", r"'\.' or '\.\.' path component"),
    ("repo_id", "/abs/name", "absolute path"),
    ("repo_id", "a/b/c", "not 'name' or 'org/name'"),
    ("repo_id", "org\\name", "backslash"),
])
def test_hub_arguments_are_names_not_paths(arg, value, why):
    kw = {"repo_id": REPO, "revision": None, arg: value}
    with pytest.raises(ValueError, match=rf"{arg}: {re.escape(repr(value))} .*{why}"):
        HubSource(kw["repo_id"], revision=kw["revision"])


def test_hub_arguments_that_are_fine():
    for rev in ("main", "refs/pr/1", "v1.0", COMMIT):
        assert HubSource(REPO, revision=rev).revision == rev
    with pytest.raises(TypeError, match="revision: expected a str"):
        HubSource(REPO, revision=1)


def test_hub_revision_outside_the_cache_was_reachable(env, tmp_path):
    """Why the constructor refuses '..': huggingface_hub joins the revision into a path under refs/."""
    import huggingface_hub

    cache = tmp_path / "hub"
    populate_hub_cache(str(cache), env[2])
    shutil.copytree(env[2], tmp_path / "elsewhere")
    (tmp_path / "planted").write_text("../../../elsewhere")       # read as the commit of revision '../../../planted'
    got = huggingface_hub.snapshot_download(REPO, revision="../../../planted", cache_dir=str(cache),
                                            local_files_only=True)
    assert os.path.realpath(got) == os.path.realpath(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"revision: '\.\./\.\./\.\./planted' has a '\.' or '\.\.' path component"):
        HubSource(REPO, revision="../../../planted", cache_dir=str(cache), local_files_only=True)


def test_hub_snapshot_resolving_outside_the_cache(lm, env, tmp_path):
    """A tampered cache: refs/main points huggingface_hub at a directory outside the cache."""
    import huggingface_hub

    cache = tmp_path / "hub"
    outside = tmp_path / "elsewhere"
    shutil.copytree(env[2], outside)
    populate_hub_cache(str(cache), env[2])
    (cache / "models--tiny-org--llama-lora" / "refs" / "main").write_text("../../../elsewhere")
    got = huggingface_hub.snapshot_download(REPO, cache_dir=str(cache), local_files_only=True)
    assert os.path.realpath(got) == os.path.realpath(outside)          # huggingface_hub returns it
    src = HubSource(REPO, cache_dir=str(cache), local_files_only=True)
    with pytest.raises(ValueError, match=rf"'tiny-org/llama-lora'.*resolves to .*elsewhere.*outside the cache "
                                         rf"directory .*hub"):
        lm.load_adapter("hub", src)
    assert_unchanged(lm)


def test_hub_snapshot_symlinked_outside_the_cache(lm, env, tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    os.makedirs(cache / "snapshots")
    os.symlink(env[2], cache / "snapshots" / "link")                 # inside by name, outside once resolved
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(cache / "snapshots" / "link"))
    with pytest.raises(ValueError, match="outside the cache directory"):
        lm.load_adapter("hub", HubSource(REPO, cache_dir=str(cache)))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(cache))
    with pytest.raises(ValueError, match="outside the cache directory"):
        lm.load_adapter("hub", HubSource(REPO, cache_dir=str(cache)))
    assert_unchanged(lm)
    shutil.copytree(env[2], cache / "snapshots" / "real")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(cache / "snapshots" / "real"))
    lm.load_adapter("hub", HubSource(REPO, cache_dir=str(cache)))      # inside: fine
    answers_like_good(lm, "hub")


# ---------------------------------------------------------------------------- special files


def _replace_weights(d, target):
    os.remove(d / "adapter_model.safetensors")
    os.symlink(target, d / "adapter_model.safetensors")


@pytest.mark.parametrize("target,why", [
    ("/proc/self/mem", "empty file"),
    ("/dev/zero", "a device, not a regular file"),
    ("DIR", "a directory, not a regular file"),
    ("FIFO", "a FIFO, not a regular file"),
    ("EMPTY", "empty file"),
    ("MISSING", "cannot be opened"),
])
def test_weights_file_that_is_not_a_regular_file(lm, env, tmp_path, target, why):
    d = copy_adapter(env, tmp_path)
    if target == "DIR":
        target = tmp_path / "a_dir"
        target.mkdir()
    elif target == "FIFO":
        target = tmp_path / "a_fifo"
        os.mkfifo(target)
    elif target == "EMPTY":
        target = tmp_path / "empty"
        target.write_bytes(b"")
    elif target == "MISSING":
        target = tmp_path / "dangling"
    _replace_weights(d, target)
    with deadline(10), pytest.raises(AdapterFormatError, match=rf"adapter_model\.safetensors: {why}"):
        lm.load_adapter("special", str(d))
    assert_unchanged(lm)


def test_bin_weights_that_are_special_files(lm, env, tmp_path):
    d = copy_adapter(env, tmp_path)
    os.remove(d / "adapter_model.safetensors")
    os.symlink("/proc/self/mem", d / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.bin: empty file"):
        lm.load_adapter("special", str(d))
    assert_unchanged(lm)


def test_symlink_to_a_regular_file_still_works(lm, env, tmp_path):
    """The Hub cache layout: snapshot files are symlinks to blobs."""
    d = copy_adapter(env, tmp_path)
    blob = tmp_path / "blob"
    shutil.move(d / "adapter_model.safetensors", blob)
    os.symlink(blob, d / "adapter_model.safetensors")
    lm.load_adapter("linked", str(d))
    answers_like_good(lm, "linked")


def test_read_error_is_wrapped(lm, env, tmp_path, monkeypatch):
    class Failing:
        """The weights file on a failing disk: reads raise EIO."""

        def __init__(self, f):
            self.f = f

        def readinto(self, b):
            raise OSError(5, "Input/output error")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real = ad._open_regular
    monkeypatch.setattr(ad, "_open_regular", lambda path: (lambda f, n: (Failing(f) if path.endswith(
        ".safetensors") else f, n))(*real(path)))
    d = copy_adapter(env, tmp_path)
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors: cannot be read \(Input/output error\)"):
        lm.load_adapter("eio", str(d))
    assert_unchanged(lm)


def test_deeply_nested_config_values(lm, env, tmp_path):
    deep = "[" * 900 + "]" * 900                                  # valid JSON, too deep for str()
    for field in ("peft_type", "bias", "r"):
        d = copy_adapter(env, tmp_path, field)
        cfg = (d / "adapter_config.json").read_text()
        (d / "adapter_config.json").write_text(cfg[:-1] + f', "{field}": {deep}}}')
        with pytest.raises((NotImplementedError, AdapterFormatError), match=rf"{field}.*\[\[\[.*\.\.\."):
            lm.load_adapter("deep", str(d))
    assert_unchanged(lm)


# ------------------------------------------------------------------- safetensors: our reader


def write_st(path, header, data=b"", header_len=None):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_reader_agrees_with_safetensors_for_every_dtype(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(7)
    names = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
             "uint16", "uint32", "uint64", "complex64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
             "float8_e5m2fnuz", "float8_e8m0fnu"]
    tensors = {}
    for i, n in enumerate(n for n in names if hasattr(torch, n)):
        dt = getattr(torch, n)
        raw = torch.randint(0, 256, (3, 5 + i, dt.itemsize), dtype=torch.uint8, generator=g)
        tensors[f"t.{n}"] = (raw % 2 == 1).squeeze(-1) if dt == torch.bool else raw.view(dt).squeeze(-1)
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    tensors["transposed"] = torch.randn(6, 4, generator=g).t().contiguous()
    path = str(tmp_path / "all.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    want, got = load_file(path), read_safetensors(path)
    assert set(got) == set(want) == set(tensors) and len(tensors) >= 13
    assert set(ad._ST_DTYPES.values()) >= {t.dtype for t in tensors.values()}
    for k, t in tensors.items():
        assert got[k].dtype == want[k].dtype == t.dtype, k
        assert got[k].shape == want[k].shape == t.shape, k
        assert torch.equal(bits(got[k]), bits(t)) and torch.equal(bits(want[k]), bits(t)), k


def test_reader_memory_is_its_own(tmp_path):
    """No mmap: overwriting or truncating the file afterwards changes nothing already read."""
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(1000, dtype=torch.float32)}, str(path))
    t = read_safetensors(str(path))["a"]
    path.write_bytes(b"\0" * 10)
    assert torch.equal(t, torch.arange(1000, dtype=torch.float32))


F32 = lambda shape, b, e: {"dtype": "F32", "shape": shape, "data_offsets": [b, e]}  # noqa: E731


@pytest.mark.parametrize("header,data,header_len,why", [
    ({"x": {"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown dtype 'F31'"),
    ({"x": F32([-1], 0, 4)}, b"\0" * 4, None, r"shape \[-1\] is not a list of integers >= 0"),
    ({"x": F32([1.5], 0, 4)}, b"\0" * 4, None, "is not a list of integers"),
    ({"x": F32([2], 0, 4)}, b"\0" * 4, None, r"shape \[2\] of F32 does not take the 4 bytes"),
    ({"x": F32([1], 4, 0)}, b"\0" * 4, None, "is not \\[begin, end\\]"),
    ({"x": F32([2], 0, 8), "y": F32([1], 4, 8)}, b"\0" * 8, None, "overlapping another tensor"),
    ({"x": F32([1], 0, 4), "y": F32([1], 8, 12)}, b"\0" * 12, None, "leaving a gap after byte 4"),
    ({"x": F32([1], 0, 4)}, b"\0" * 8, None, "4 bytes of data after the last tensor"),
    ({"x": F32([4], 0, 16)}, b"\0" * 8, None, "truncated safetensors file: tensor 'x' ends at byte 16"),
    ({"x": F32([1], 0, 4), "__metadata__": {"a": 1}}, b"\0" * 4, None, "__metadata__ must map strings"),
    ({"x": [1, 2]}, b"", None, "expected an object with dtype"),
    ([1, 2], b"", None, "expected a JSON object"),
    ({"x": F32([1], 0, 4)}, b"\0" * 4, (100 << 20) + 1, "a header of 104857601 bytes, above the limit"),
    ({"x": F32([1], 0, 4)}, b"\0" * 4, 10 ** 6, "truncated or corrupt safetensors file: a header of 1000000 bytes"),
    ({"x": F32([10 ** 4000, 10 ** 4000], 0, 4)}, b"\0" * 4, None, "does not take the 4 bytes"),
])
def test_corrupt_safetensors_headers(tmp_path, header, data, header_len, why):
    path = write_st(str(tmp_path / "bad.safetensors"), header, data, header_len)
    with pytest.raises(AdapterFormatError, match=re.escape(path) + ".*" + why):
        read_safetensors(path)


def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
    with pytest.raises(AdapterFormatError, match=re.escape(str(path)) + ".*header is not UTF-8 JSON"):
        read_safetensors(str(path))
    path.write_bytes(b"\1\2\3")
    with pytest.raises(AdapterFormatError, match=re.escape(str(path)) + r".*truncated safetensors file \(3 bytes"):
        read_safetensors(str(path))


# --------------------------------------------------------------- header first: huge files

GIB4 = 4 << 30


def sparse_adapter(env, tmp_path, file_size=None):
    """A directory whose weights file declares q_proj lora_A of 4 GiB (sparse: costs no disk)."""
    d = copy_adapter(env, tmp_path, "huge")
    header = {QA: F32([1 << 28, 4], 0, GIB4)}
    raw = json.dumps(header).encode()
    path = d / "adapter_model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(file_size if file_size is not None else 8 + len(raw) + GIB4)
    return d, str(path)


def test_huge_file_refused_by_the_expectation_before_reading(env, tmp_path):
    d, path = sparse_adapter(env, tmp_path)
    seen = []

    def check(origin, shapes):
        seen.append((origin, shapes))
        for key, shape in shapes.items():
            hit = split_key(key)
            if hit is not None and hit[1] == "lora_A" and shape[0] > 16:
                raise ValueError(f"{origin}: {key!r} has rank {shape[0]}, above max_rank=16")

    t0 = time.perf_counter()
    for read in (lambda: read_safetensors(path, Expectation(check=check)),
                 lambda: read_adapter_dir(str(d), Expectation(check=check)),
                 lambda: load_adapter_weights(LocalSource(d), Expectation(check=check))):
        with pytest.raises(ValueError, match=re.escape(path) + r".*rank 268435456, above max_rank=16"):
            read()
    assert time.perf_counter() - t0 < 1.0
    assert seen == [(path, {QA: (1 << 28, 4)})] * 3
    with pytest.raises(ValueError, match=re.escape(path) + r": safetensors data of 4294967296 bytes, above the "
                                                            r"model's limit of max_bytes=1048576"):
        read_safetensors(path, Expectation(max_bytes=1 << 20))
    assert time.perf_counter() - t0 < 1.0


def test_huge_header_offsets_beyond_the_file(lm, env, tmp_path):
    d, path = sparse_adapter(env, tmp_path, file_size=GIB4)
    t0 = time.perf_counter()
    with pytest.raises(AdapterFormatError, match=re.escape(path) + r": truncated safetensors file: tensor .*q_proj"
                                                                    r".* ends at byte 4294967296"):
        read_safetensors(path)
    # through a model: its expectation refuses the size first (the most an adapter for it can hold)
    with pytest.raises(ValueError, match=re.escape(path) + r": safetensors data of \d+ bytes, above the model's "
                                                            r"limit of max_bytes="):
        lm.load_adapter("huge", str(d))
    assert time.perf_counter() - t0 < 1.0
    assert_unchanged(lm)


def test_huge_file_with_a_header_the_model_refuses(lm, env, tmp_path):
    """A consistent 4 GiB file: refused by the model's byte bound, unread. A header within the
    byte bound whose shapes do not fit: refused from the header, unread."""
    big, big_path = sparse_adapter(env, tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(big_path) + r": safetensors data of 4294967296 bytes, above"):
        lm.load_adapter("huge", str(big))
    assert time.perf_counter() - t0 < 1.0
    assert_unchanged(lm)
    d = copy_adapter(env, tmp_path, "wide")
    header = {QA: F32([4, 1 << 14], 0, 4 << 16)}
    raw = json.dumps(header).encode()
    path = d / "adapter_model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + (4 << 16))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*q_proj.*does not fit.*shape \(4, 16384\).*lora_A \[r, 32\]"):
        lm.load_adapter("wide", str(d))
    assert_unchanged(lm)


# ------------------------------------------------------------------------ expectation hook


def test_expectation_sees_the_file_shapes_and_can_pass(env, tmp_path):
    seen = []
    cfg, tensors = read_adapter_dir(env[2], Expectation(check=lambda o, s: seen.append((o, s)), max_bytes=1 << 20))
    want = good_tensors(env)
    assert seen == [(os.path.join(env[2], "adapter_model.safetensors"), {k: tuple(v.shape) for k, v in want.items()})]
    assert set(tensors) == set(want) and all(torch.equal(tensors[k], want[k]) for k in want)
    assert cfg == good_config(env)


def test_expectation_on_bin_files(env, tmp_path):
    d = copy_adapter(env, tmp_path)
    os.remove(d / "adapter_model.safetensors")
    torch.save(good_tensors(env), d / "adapter_model.bin")
    path = str(d / "adapter_model.bin")
    seen = []
    read_bin(path, Expectation(check=lambda o, s: seen.append((o, s))))
    assert seen == [(path, {k: tuple(v.shape) for k, v in good_tensors(env).items()})]
    size = os.path.getsize(path)
    with pytest.raises(ValueError, match=re.escape(path) + rf": weights file of {size} bytes, above .*max_bytes=100"):
        load_adapter_weights(LocalSource(d), Expectation(max_bytes=100))
    # refused unread: garbage of that size is not even given to torch.load
    (d / "adapter_model.bin").write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="above the model's limit"):
        read_bin(path, Expectation(max_bytes=100))


def test_expectation_on_hub_and_custom_sources(env, tmp_path):
    cache = tmp_path / "hub"
    populate_hub_cache(str(cache), env[2])
    seen = []
    w = load_adapter_weights(HubSource(REPO, cache_dir=str(cache), local_files_only=True),
                             Expectation(check=lambda o, s: seen.append(o)))
    assert seen[0].endswith(os.path.join("snapshots", COMMIT, "adapter_model.safetensors"))
    assert sorted(w.modules) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                 "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]

    calls = []

    class Store:
        def load(self):                          # the custom protocol stays load() without arguments
            calls.append(1)
            return good_config(env), good_tensors(env)

        def __repr__(self):
            return "Store()"

    def refuse(origin, shapes):
        raise ValueError(f"{origin}: {len(shapes)} tensors refused")

    with pytest.raises(ValueError, match=r"Store\(\): 8 tensors refused"):
        load_adapter_weights(Store(), Expectation(check=refuse))
    nbytes = sum(t.numel() * t.element_size() for t in good_tensors(env).values())
    with pytest.raises(ValueError, match=rf"Store\(\): tensors of {nbytes} bytes, above the model's limit"):
        load_adapter_weights(Store(), Expectation(max_bytes=nbytes - 1))
    assert load_adapter_weights(Store(), Expectation(max_bytes=nbytes)).max_rank == 4
    assert calls == [1, 1, 1]
    tensors = good_tensors(env)
    tensors[QA] = torch.empty(tensors[QA].shape, device="meta")     # refused before the check sees it
    with pytest.raises(AdapterFormatError, match="meta device"):
        load_adapter_weights(ad.CallableSource(lambda: (good_config(env), tensors)), Expectation(check=refuse))


def test_expectation_arguments():
    with pytest.raises(ValueError, match="max_bytes"):
        Expectation(max_bytes=-1)
    with pytest.raises(TypeError, match="check"):
        Expectation(check=3)
