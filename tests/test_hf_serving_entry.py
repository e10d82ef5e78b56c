"""The lower-level entry for serving stacks: per-token slots (or a LoRABatchMeta) set once, then the
patched nn.Module called with no extra arguments. Also the lm_head layout (fewer positions per row
than the input during generation)."""
import copy

import pytest
import torch
from torch import nn

import openlora_kernels as olk

from hf_models import ATOL, RTOL, left_padded_batch, make_model, peft_model, save_adapter


class TokenMLP(nn.Module):
    """Tokens are independent here, so a packed batch of tokens with mixed adapters has an exact
    per-token reference: PEFT with that token's adapter."""

    def __init__(self, k=24, hidden=40):
        super().__init__()
        self.fc1 = nn.Linear(k, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, k)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.fixture(scope="module")
def mlp_env(tmp_path_factory):
    from peft import LoraConfig

    torch.manual_seed(0)
    base = TokenMLP().eval()
    root = tmp_path_factory.mktemp("mlp")
    cfgs = {"A": LoraConfig(r=4, target_modules=["fc1"], init_lora_weights=False),
            "B": LoraConfig(r=8, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False, use_rslora=True),
            "C": LoraConfig(r=2, target_modules=["fc2"], init_lora_weights=False)}
    paths = {n: save_adapter(base, c, str(root / n), seed=20 + i) for i, (n, c) in enumerate(cfgs.items())}
    return base, paths


def per_token_reference(base, paths, x, names):
    with torch.no_grad():
        outs = {n: peft_model(base, p)(x) for n, p in paths.items()}
        outs[None] = base(x)
    return torch.stack([outs[n][t] for t, n in enumerate(names)])


def test_packed_tokens_with_per_token_adapters(mlp_env):
    base, paths = mlp_env
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=3, max_rank=8)
    for n, p in paths.items():
        lm.load_adapter(n, p)
    x = torch.randn(13, 24)
    names = ["A", "B", None, "C", "C", "A", "B", "B", None, "A", "C", "B", "A"]
    want = per_token_reference(base, paths, x, names)

    with lm.batch(names):                                    # names per token
        with torch.no_grad():
            got = lm.model(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)

    slots = lm.acquire(["A", "B", "C"])                      # slot ids per token
    ids = torch.tensor([-1 if n is None else slots[n] for n in names])
    for batch in (ids, olk.build_batch_meta(ids, 3)):
        lm.set_batch(batch)
        with torch.no_grad():
            torch.testing.assert_close(lm.model(x), want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(lm.model(x.view(13, 1, 24)).view(13, 24), want, atol=ATOL, rtol=RTOL)
    lm.clear_batch()
    lm.release()
    with torch.no_grad():
        assert torch.equal(lm.model(x), base(x))             # cleared: the base model again


def test_acquired_adapters_are_not_evicted(mlp_env):
    base, paths = mlp_env
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8)
    for n, p in paths.items():
        lm.load_adapter(n, p)
    held = lm.acquire(["A", "B"])
    with pytest.raises(RuntimeError, match="no device slot can be freed"):
        lm.acquire(["C"])
    lm.release(["A"])
    got = lm.acquire(["C"])
    assert got["C"] == held["A"] and lm.pool.slot_of("B") == held["B"]
    with pytest.raises(RuntimeError, match="held"):
        lm.unload_adapter("B")


def test_token_count_mismatch_names_the_layer(mlp_env):
    base, paths = mlp_env
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=3, max_rank=8)
    lm.load_adapter("A", paths["A"])
    lm.set_batch(["A"] * 5)
    with pytest.raises(RuntimeError, match=r"layer 'fc1'.*7 rows.*5 tokens"):
        with torch.no_grad():
            lm.model(torch.randn(7, 24))
    lm.clear_batch()


def test_set_batch_on_a_causal_lm_equals_adapter_names(tmp_path):
    from peft import LoraConfig

    base = make_model("qwen2")
    path = save_adapter(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), str(tmp_path / "a"), 1)
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8)
    lm.load_adapter("a", path)
    ids, mask = left_padded_batch([5, 3, 4], seed=5)
    want = lm(input_ids=ids, attention_mask=mask, adapter_names=[None, "a", "a"]).logits
    slot = lm.acquire(["a"])["a"]
    tokens = torch.tensor([-1, slot, slot]).repeat_interleave(ids.shape[1])
    with lm.batch(tokens), torch.no_grad():
        got = lm.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)


def test_adapter_on_lm_head_in_forward_and_generate(tmp_path):
    """lm_head (patched on request) sees only the last position during generation."""
    from peft import LoraConfig

    base = make_model("llama")
    path = save_adapter(base, LoraConfig(r=4, target_modules=["v_proj", "lm_head"], init_lora_weights=False),
                        str(tmp_path / "head"), 2)
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8, target_modules=["v_proj", "lm_head"])
    lm.load_adapter("head", path)          # PEFT saved a copy of lm_head's weight: equal to the model's
    ref = peft_model(base, path)
    ids, mask = left_padded_batch([6, 4], seed=6)
    out = lm(input_ids=ids, attention_mask=mask, adapter_names=["head", None]).logits
    with torch.no_grad():
        torch.testing.assert_close(out[0][mask[0].bool()], ref(input_ids=ids, attention_mask=mask).logits[0][mask[0].bool()],
                                   atol=ATOL, rtol=RTOL)
        kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        got = lm.generate(input_ids=ids, adapter_names=["head", None], **kw)
        assert torch.equal(got[0], ref.generate(input_ids=ids, **kw)[0])
        assert torch.equal(got[1], base.generate(input_ids=ids, **kw)[1])


def test_adapter_whose_saved_lm_head_differs_from_the_model(tmp_path):
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    base = make_model("llama")
    path = save_adapter(base, LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False), str(tmp_path / "h"), 2)
    f = f"{path}/adapter_model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if k.endswith("base_layer.weight"))
    sd[key] = sd[key] + 1.0
    save_file(sd, f)
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8, target_modules=["lm_head"])
    with pytest.raises(NotImplementedError, match="lm_head.weight.*different from the model"):
        lm.load_adapter("h", path)


def test_metadata_is_built_once_per_layout(tmp_path, monkeypatch):
    """Once per forward at most, and not again for a forward with the same slots and shape."""
    from peft import LoraConfig
    import openlora_kernels.hf_patch as hf_patch

    base = make_model("llama")
    path = save_adapter(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), str(tmp_path / "a"), 3)
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8)
    lm.load_adapter("a", path)
    built = []
    real = hf_patch.build_batch_meta
    monkeypatch.setattr(hf_patch, "build_batch_meta", lambda *a, **k: built.append(1) or real(*a, **k))
    ids, mask = left_padded_batch([4, 6], seed=1)
    first = lm(input_ids=ids, attention_mask=mask, adapter_names=["a", None]).logits
    again = lm(input_ids=ids, attention_mask=mask, adapter_names=["a", None]).logits
    assert len(built) == 1 and torch.equal(first, again)
    lm(input_ids=ids, attention_mask=mask, adapter_names=[None, "a"])
    assert len(built) == 2
    lm.generate(input_ids=ids, attention_mask=mask, adapter_names=["a", None], max_new_tokens=6, do_sample=False,
                pad_token_id=0)
    assert len(built) == 3       # the prefill shape was cached; the 5 decode steps share one metadata


def test_layout_cache_evicts_least_recently_used_one_at_a_time(tmp_path, monkeypatch):
    """Past CACHE_SIZE layouts, only the oldest is dropped: a layout in steady use keeps its
    metadata tensors (what a replayed CUDA graph would read)."""
    from peft import LoraConfig
    import openlora_kernels.hf_patch as hf_patch

    base = make_model("llama")
    path = save_adapter(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), str(tmp_path / "a"), 3)
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8)
    lm.load_adapter("a", path)
    monkeypatch.setattr(hf_patch._MetaCache, "CACHE_SIZE", 3)
    ids = torch.randint(0, 100, (2, 3))
    lm(input_ids=ids, adapter_names=["a", None])
    hot_key = ((lm.pool.slot_of("a"), -1), 2, 3, ids.device)
    hot = lm._meta_cache.get(hot_key)[0]
    for i in range(2, 7):     # new layouts, the hot one used in between
        lm(input_ids=torch.randint(0, 100, (2, i)), adapter_names=["a", None])
        lm(input_ids=ids, adapter_names=["a", None])
        assert lm._meta_cache.get(hot_key)[0] is hot
    assert len(lm._meta_cache) == 3


def test_unpatched_model_object_is_closed(tmp_path):
    from peft import LoraConfig

    base = make_model("llama")
    path = save_adapter(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), str(tmp_path / "a"), 3)
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8)
    lm.load_adapter("a", path)
    model = lm.unpatch()
    ids = torch.randint(0, 100, (1, 3))
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
    for call in (lambda: lm.load_adapter("b", path), lambda: lm(input_ids=ids, adapter_names=["a"]),
                 lambda: lm.memory_report(), lambda: lm.set_batch(["a"])):
        with pytest.raises(RuntimeError, match="unpatched"):
            call()


def test_patched_forwards_are_wrappers_that_copy_and_unpatch_cleanly(tmp_path):
    """The LoRA runs in an instance-attribute forward (hf_patch._ForwardWrap), not in nn.Module
    hooks: no patched module (nor the top model) has hooks. A deep copy of a patched layer computes
    with its OWN weights (the wrapper is copied with the module: a shared closure would call the
    original's). unpatch() restores the class's forward; a forward wrapped again after patching
    (what accelerate's hooks do) is kept, and ours inside it passes through."""
    from peft import LoraConfig

    base = make_model("llama")
    path = save_adapter(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                        str(tmp_path / "a"), 3)
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8)
    lm.load_adapter("a", path)
    model = lm.model
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    q = model.model.layers[0].self_attn.q_proj
    assert "forward" in q.__dict__ and "forward" in model.__dict__
    x = torch.randn(3, q.in_features)
    twin = copy.deepcopy(q)
    with torch.no_grad():
        twin.weight.mul_(2.0)
        want = torch.nn.functional.linear(x, twin.weight, twin.bias)
        torch.testing.assert_close(twin(x), want, rtol=0, atol=0)    # no batch state: the base only
        torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.weight, q.bias), rtol=0, atol=0)
    seen = []
    v = model.model.layers[0].self_attn.v_proj
    ours = v.forward

    def outer(*a, **k):           # wrapped again after patching
        seen.append(1)
        return ours(*a, **k)
    v.forward = outer
    ids = torch.randint(0, 100, (2, 3))
    with torch.no_grad():
        lm(input_ids=ids, adapter_names=["a", None])
    assert seen
    lm.unpatch()
    assert "forward" not in q.__dict__ and "forward" not in model.__dict__
    assert v.forward is outer                                    # kept; ours inside passes through
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_decode_batches_take_the_native_fast_path(mlp_env, monkeypatch):
    """A decode-like CPU batch goes through BoundLoRA.add_rows in every patched layer (one native
    call each), and gives the same bits as the checked path it replaces."""
    from openlora_kernels.ops import api, cpu_ext
    if cpu_ext.unavailable_reason() is not None:
        pytest.skip("native CPU backend not built")
    base, paths = mlp_env
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=3, max_rank=8)
    for n, p in paths.items():
        lm.load_adapter(n, p)
    x = torch.randn(6, 1, 24)
    names = ["A", "B", None, "C", "B", "A"]
    served = []
    real = api.BoundLoRA.add_rows

    def spy(self, y, x_, rows):
        done = real(self, y, x_, rows)
        served.append(done)
        return done

    monkeypatch.setattr(api.BoundLoRA, "add_rows", spy)
    fast = lm(x, adapter_names=names)
    assert served == [True, True]                       # fc1 and fc2, both natively
    monkeypatch.setattr(api.BoundLoRA, "add_rows", lambda self, y, x_, rows: False)
    checked = lm(x, adapter_names=names)
    assert torch.equal(fast, checked)
    want = per_token_reference(base, paths, x[:, 0], names)
    torch.testing.assert_close(fast[:, 0], want, atol=ATOL, rtol=RTOL)


def test_frozen_adapters_give_the_base_its_true_gradients(mlp_env):
    """Grad enabled with base parameters that require grad, frozen adapters in the batch: the
    forward gives the served values and the backward gives the base weights the gradients PEFT
    gives them (the LoRA path's share of x's gradient included), base rows as the plain model."""
    from peft import PeftModel

    base, paths = mlp_env
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=3, max_rank=8)
    for n, p in paths.items():
        lm.load_adapter(n, p)
    assert all(p.requires_grad for p in lm.model.parameters())
    x = torch.randn(5, 24)
    with lm.batch(["B"] * 5):
        with torch.no_grad():
            want = lm.model(x)
        got = lm.model(x)
        assert got.requires_grad and torch.equal(got, want)
        (got * torch.arange(24.0)).sum().backward()
    ref = PeftModel.from_pretrained(copy.deepcopy(base), paths["B"])
    for n, p in ref.named_parameters():
        p.requires_grad_("lora_" not in n)
    (ref(x) * torch.arange(24.0)).sum().backward()
    for mod in ("fc1", "fc2"):
        torch.testing.assert_close(getattr(lm.model, mod).weight.grad, getattr(ref.base_model.model, mod).base_layer.weight.grad,
                                   atol=ATOL, rtol=RTOL)
    lm.model.zero_grad()
    lm.model(x).sum().backward()                         # no batch: the base model, gradients as usual
    ref2 = copy.deepcopy(base)
    ref2(x).sum().backward()
    assert torch.equal(lm.model.fc1.weight.grad, ref2.fc1.weight.grad)
