"""Bad input to patch_model / load_adapter / a batch: a Python exception naming the problem, and
nothing changed: the adapters loaded before answer exactly as before, the bad name is not loaded."""
import copy
import json
import os
import shutil

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.adapters import AdapterFormatError

from hf_models import left_padded_batch, make_model, save_adapter


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from peft import LoraConfig

    base = make_model("llama")
    root = tmp_path_factory.mktemp("errors")
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


def saved(env, name, seed=3, base=None, **cfg):
    from peft import LoraConfig

    b, root, _ = env
    kw = dict(r=4, target_modules=["q_proj"], init_lora_weights=False)
    kw.update(cfg)
    return save_adapter(base if base is not None else b, LoraConfig(**kw), str(root / name), seed=seed)


def copy_adapter(env, name):
    _, root, good = env
    dst = root / name
    shutil.copytree(good, dst, dirs_exist_ok=True)
    return dst


# ------------------------------------------------------------------------------- load errors


def test_missing_path(lm, tmp_path):
    missing = str(tmp_path / "no_such_adapter")
    with pytest.raises(FileNotFoundError, match="no_such_adapter"):
        lm.load_adapter("x", missing)
    with pytest.raises(FileNotFoundError, match="no_such_adapter"):
        lm.load_adapter("x", tmp_path / "no_such_adapter")
    assert_unchanged(lm)


def test_directory_without_config(lm, env, tmp_path):
    d = tmp_path / "weights_only"
    d.mkdir()
    shutil.copy(os.path.join(env[2], "adapter_model.safetensors"), d)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lm.load_adapter("x", str(d))
    assert_unchanged(lm)


def test_rank_above_max_rank(lm, env):
    with pytest.raises(ValueError, match=r"rank 32.*max_rank=16"):
        lm.load_adapter("big", saved(env, "r32", r=32))
    assert_unchanged(lm)


def test_shapes_that_do_not_fit_the_model(lm, env):
    other = make_model("llama", hidden=48)
    with pytest.raises(ValueError, match=r"q_proj.*does not fit.*\(4, 48\).*32 -> 32"):
        lm.load_adapter("other", saved(env, "wide", base=other))
    assert_unchanged(lm)


def test_adapter_for_modules_the_model_lacks(lm, env):
    gpt2 = make_model("gpt2")
    with pytest.raises(ValueError, match=r"c_attn.*does not exist in the model"):
        lm.load_adapter("gpt2", saved(env, "gpt2ad", base=gpt2, target_modules=["c_attn"], fan_in_fan_out=True))
    assert_unchanged(lm)


def test_adapter_for_a_module_that_is_not_patched(env):
    base, root, good = env
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"v_proj.*is not patched"):
        lm.load_adapter("good", good)
    assert lm.adapters == ()
    lm_head = saved(env, "head", target_modules=["lm_head"])
    lm2 = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8)     # None: lm_head excluded
    with pytest.raises(ValueError, match=r"lm_head.*is not patched"):
        lm2.load_adapter("head", lm_head)


@pytest.mark.parametrize("field,cfg", [
    ("trainable_token_indices", dict(trainable_token_indices=[3, 5])),
    ("lora_bias", dict(lora_bias=True)),
    ("modules_to_save", dict(modules_to_save=["lm_head"])),
])
def test_unsupported_config_fields(lm, env, field, cfg):
    with pytest.raises(NotImplementedError, match=field):
        lm.load_adapter("bad", saved(env, field, **cfg))
    assert_unchanged(lm)


def test_non_lora_peft_type(lm, env):
    from peft import IA3Config, get_peft_model

    path = str(env[1] / "ia3")
    get_peft_model(copy.deepcopy(env[0]), IA3Config(target_modules=["k_proj", "down_proj"],
                                                    feedforward_modules=["down_proj"])).save_pretrained(path)
    with pytest.raises(NotImplementedError, match="peft_type 'IA3'"):
        lm.load_adapter("ia3", path)
    assert_unchanged(lm)


def test_truncated_weights_file(lm, env):
    d = copy_adapter(env, "truncated")
    f = d / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match=r"truncated.*adapter_model\.safetensors|adapter_model\.safetensors.*truncated"):
        lm.load_adapter("t", str(d))
    assert_unchanged(lm)


def test_corrupt_weights_file(lm, env):
    d = copy_adapter(env, "corrupt")
    (d / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors"):
        lm.load_adapter("c", str(d))
    assert_unchanged(lm)


def test_corrupt_config(lm, env):
    d = copy_adapter(env, "badjson")
    (d / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    with pytest.raises(ValueError, match=r"adapter_config\.json.*not valid JSON"):
        lm.load_adapter("j", str(d))
    assert_unchanged(lm)


def test_config_rank_disagreeing_with_the_weights(lm, env):
    d = copy_adapter(env, "rankmismatch")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"v_proj": 2}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"v_proj.*rank 2"):
        lm.load_adapter("m", str(d))
    assert_unchanged(lm)


class _Evil:
    """Pickles to a call that would create a file if the loader unpickled arbitrary objects."""

    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bin_weights_never_unpickle_objects(lm, env, tmp_path):
    d = copy_adapter(env, "evil")
    os.remove(d / "adapter_model.safetensors")
    _Evil.marker = str(tmp_path / "pwned")
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Evil()}, d / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.bin.*weights_only"):
        lm.load_adapter("evil", str(d))
    assert not os.path.exists(_Evil.marker)
    assert_unchanged(lm)


def test_bin_weights_with_tensors_only_load(lm, env):
    from safetensors.torch import load_file

    d = copy_adapter(env, "asbin")
    torch.save(load_file(d / "adapter_model.safetensors"), d / "adapter_model.bin")
    os.remove(d / "adapter_model.safetensors")
    lm.load_adapter("bin", str(d))
    ids, mask, want = lm.reference
    got = lm(input_ids=ids, attention_mask=mask, adapter_names=["bin", None]).logits
    assert torch.equal(got, want)


def test_bad_names(lm, env):
    for name, exc in (("", ValueError), ("   ", ValueError), ("__base__", ValueError), (3, TypeError)):
        with pytest.raises(exc, match="name"):
            lm.load_adapter(name, env[2])
    with pytest.raises(ValueError, match="'good' is already loaded"):
        lm.load_adapter("good", env[2])
    assert_unchanged(lm)


def test_failed_reread_leaves_no_half_written_slot(env):
    """An adapter dropped from host memory whose source changed: the batch fails, nothing else does."""
    base, root, good = env
    changing = {"path": good}
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=1, max_rank=16, host_budget_bytes=0)
    lm.load_adapter("other", saved(env, "other_ok", target_modules=["q_proj", "o_proj"], seed=8))
    lm.load_adapter("flaky", lambda: olk.adapters.read_adapter_dir(changing["path"]))
    ids, mask = left_padded_batch([5, 3], seed=2)
    want = lm(input_ids=ids, attention_mask=mask, adapter_names=["other", None]).logits
    changing["path"] = saved(env, "changed", r=8, target_modules=["q_proj", "k_proj"])
    with pytest.raises(RuntimeError, match="'flaky'.*changed"):
        lm(input_ids=ids, attention_mask=mask, adapter_names=["flaky", None])
    assert lm.pool.slot_of("flaky") is None
    assert torch.equal(lm(input_ids=ids, attention_mask=mask, adapter_names=["other", None]).logits, want)


# ------------------------------------------------------------------------------ batch errors


def test_unknown_adapter_in_batch(lm):
    ids, mask, _ = lm.reference
    with pytest.raises(KeyError, match="'nope'"):
        lm(input_ids=ids, attention_mask=mask, adapter_names=["good", "nope"])
    assert_unchanged(lm)


def test_adapter_names_of_the_wrong_length(lm):
    ids, mask, _ = lm.reference
    with pytest.raises(ValueError, match="3 names for a batch of 2 rows"):
        lm(input_ids=ids, attention_mask=mask, adapter_names=["good", None, None])
    with pytest.raises(ValueError, match="3 names for a batch of 2 rows"):
        lm.generate(input_ids=ids, attention_mask=mask, adapter_names=["good", None, None], max_new_tokens=2)
    with pytest.raises(ValueError, match="1 names for a batch of 2 rows"):
        lm.generate(inputs=ids, attention_mask=mask, adapter_names=["good"], max_new_tokens=2)
    with pytest.raises(ValueError, match="3 names for a batch of 2 rows"):
        lm.generate(ids, attention_mask=mask, adapter_names=["good", None, None], max_new_tokens=2)
    with pytest.raises(TypeError, match="adapter_names"):
        lm(input_ids=ids, attention_mask=mask, adapter_names="good")
    assert_unchanged(lm)


def test_empty_adapter_name_in_batch(lm):
    ids, mask, _ = lm.reference
    with pytest.raises(ValueError, match=r"adapter_names\[1\]: empty adapter name"):
        lm(input_ids=ids, attention_mask=mask, adapter_names=["good", ""])
    assert_unchanged(lm)


# ------------------------------------------------------------------------------ patch errors


def test_patch_model_arguments(env):
    base = env[0]
    with pytest.raises(ValueError, match="backend.*'cuda-fast'"):
        olk.patch_model(copy.deepcopy(base), backend="cuda-fast")
    with pytest.raises(ValueError, match="max_adapters"):
        olk.patch_model(copy.deepcopy(base), max_adapters=0)
    with pytest.raises(ValueError, match="max_rank"):
        olk.patch_model(copy.deepcopy(base), max_rank=-1)
    with pytest.raises(ValueError, match="matched no"):
        olk.patch_model(copy.deepcopy(base), target_modules=["no_such_proj"])
    with pytest.raises(ValueError, match="LlamaRMSNorm"):
        olk.patch_model(copy.deepcopy(base), target_modules=r".*input_layernorm")
    with pytest.raises(TypeError, match="target_modules"):
        olk.patch_model(copy.deepcopy(base), target_modules=3)


def test_quantized_base_layer_is_refused():
    lin = torch.nn.Linear(8, 8)
    lin.weight = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.uint8), requires_grad=False)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), lin)
    with pytest.raises(NotImplementedError, match=r"module '1'.*torch.uint8.*quantized"):
        olk.patch_model(model)
    olk.patch_model(model, target_modules=["0"])          # the float layer alone is fine
