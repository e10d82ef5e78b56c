"""Where adapters come from: a local directory, a Hub repo id (offline, from a pre-populated cache),
a callable or an object with load() returning (config, tensors). Every source must give the same
numbers as the directory PEFT wrote."""
import copy
import os
import shutil

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.adapters import AdapterSource, HubSource, read_adapter_dir

from hf_models import left_padded_batch, make_model, save_adapter

REPO = "tiny-org/llama-lora"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from peft import LoraConfig

    base = make_model("llama")
    path = save_adapter(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                         init_lora_weights=False), str(tmp_path_factory.mktemp("src") / "ad"), seed=5)
    ids, mask = left_padded_batch([4, 6], seed=9)
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8)
    lm.load_adapter("dir", path)
    want = lm(input_ids=ids, attention_mask=mask, adapter_names=["dir", None]).logits
    return base, path, ids, mask, want


def check(env, source):
    base, path, ids, mask, want = env
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8)
    lm.load_adapter("x", source)
    got = lm(input_ids=ids, attention_mask=mask, adapter_names=["x", None]).logits
    assert torch.equal(got, want)
    return lm


def test_callable_source(env):
    calls = []

    def fetch():
        calls.append(1)
        return read_adapter_dir(env[1])

    check(env, fetch)
    assert calls == [1]


def test_protocol_source_with_peft_config_object(env):
    from peft import LoraConfig
    from safetensors.torch import load_file

    class Registry:
        """What an object store / registry client would look like."""

        def load(self):
            cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"])
            tensors = load_file(os.path.join(env[1], "adapter_model.safetensors"))
            # keys without PEFT's "base_model.model." prefix are accepted too
            return cfg, {k.replace("base_model.model.", ""): v for k, v in tensors.items()}

    assert isinstance(Registry(), AdapterSource)
    check(env, Registry())


def test_callable_source_returning_garbage(env):
    lm = olk.patch_model(copy.deepcopy(env[0]), max_adapters=2, max_rank=8)
    with pytest.raises(TypeError, match="config must be a dict"):
        lm.load_adapter("x", lambda: (42, {}))
    with pytest.raises(ValueError, match="no lora_A / lora_B weights"):
        lm.load_adapter("x", lambda: ({"r": 4}, {}))
    with pytest.raises(ValueError, match="has no lora_B.weight"):
        lm.load_adapter("x", lambda: ({"r": 4}, {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}))
    assert lm.adapters == ()


def populate_hub_cache(cache: str, repo: str, files_from: str, revision="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub uses: models--org--name/{refs/main, snapshots/<commit>/...}."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(revision)
    shutil.copytree(files_from, os.path.join(root, "snapshots", revision))


def test_hub_id_offline_from_local_cache(env, tmp_path, monkeypatch):
    cache = str(tmp_path / "hub")
    populate_hub_cache(cache, REPO, env[1])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.chdir(tmp_path)                 # "tiny-org/llama-lora" is not a local directory here
    lm = check(env, REPO)
    assert "HubSource('tiny-org/llama-lora')" in repr(lm.pool._entries["x"].source)
    check(env, HubSource(REPO, cache_dir=cache, local_files_only=True))


def test_hub_id_missing_offline(env, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    lm = olk.patch_model(copy.deepcopy(env[0]), max_adapters=2, max_rank=8)
    with pytest.raises(FileNotFoundError, match=r"'tiny-org/absent'.*local Hub cache \(offline\)"):
        lm.load_adapter("x", "tiny-org/absent")
    assert lm.adapters == ()


def test_source_that_is_a_file_or_not_a_source(env):
    lm = olk.patch_model(copy.deepcopy(env[0]), max_adapters=2, max_rank=8)
    with pytest.raises(ValueError, match="is a file"):
        lm.load_adapter("x", os.path.join(env[1], "adapter_config.json"))
    with pytest.raises(TypeError, match="source"):
        lm.load_adapter("x", 12)
