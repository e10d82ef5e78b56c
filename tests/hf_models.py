"""Tiny random-init Hugging Face models and PEFT-saved adapters for the patching tests (no hub).

Each architecture lists, as test data, the module names its three adapters target:

    attn   r=4,  alpha 8,   attention projections of layer 1 only (layers_to_transform)
    mlp    r=8,  alpha 16,  MLP projections, rsLoRA (scaling alpha / sqrt(r)); MoE models: the
                            fused expert weights (target_parameters) and o_proj
    mix    r=6,  alpha 12,  "all-linear" (on MoE models PEFT adds the expert and router weights),
                            rank_pattern and alpha_pattern on two modules

Decoder-only models (AutoModelForCausalLM), encoder-decoder ones (T5, BART: Seq2SeqLM) and an
encoder (BERT: MaskedLM) are built tiny from their configs.

PEFT writes them with ``save_pretrained`` (random A and B: ``init_lora_weights=False``), so the
files are exactly what users have. The reference for a row that uses adapter ``n`` is a PEFT model
holding adapter ``n`` alone, run on the same batch.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2


@dataclass(frozen=True)
class Arch:
    name: str
    attn: List[str]          # attention modules (suffixes)
    mlp: List[str]           # MLP modules (suffixes); MoE models: none, the experts are `params`
    fan_in_fan_out: bool = False
    kind: str = "causal"     # "causal" (AutoModelForCausalLM), "seq2seq", "masked" (an encoder: no generate)
    params: List[str] = field(default_factory=list)   # the mlp adapter's target_parameters (MoE experts)

    @property
    def mlp_keys(self) -> List[str]:
        """Names the mlp adapter's weights are found under (rank_pattern / alpha_pattern keys)."""
        return self.mlp or [p.rsplit(".", 1)[-1] for p in self.params]


MOE_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]

ARCHS: Dict[str, Arch] = {
    "llama": Arch("llama", ["q_proj", "v_proj"], ["gate_proj", "down_proj"]),
    "qwen2": Arch("qwen2", ["q_proj", "k_proj", "o_proj"], ["up_proj", "down_proj"]),
    "gpt2": Arch("gpt2", ["c_attn"], ["c_fc", "mlp.c_proj"], fan_in_fan_out=True),
    "phi3": Arch("phi3", ["qkv_proj", "o_proj"], ["gate_up_proj", "down_proj"]),
    "gpt_neox": Arch("gpt_neox", ["query_key_value", "dense"], ["dense_h_to_4h", "dense_4h_to_h"]),
    "opt": Arch("opt", ["q_proj", "v_proj"], ["fc1", "fc2"]),
    "mistral": Arch("mistral", ["q_proj", "v_proj"], ["up_proj", "down_proj"]),
    "gemma": Arch("gemma", ["q_proj", "o_proj"], ["gate_proj", "down_proj"]),
    "gemma2": Arch("gemma2", ["k_proj", "v_proj"], ["up_proj", "down_proj"]),
    "falcon": Arch("falcon", ["query_key_value", "dense"], ["dense_h_to_4h", "dense_4h_to_h"]),
    "bloom": Arch("bloom", ["query_key_value"], ["dense_h_to_4h", "dense_4h_to_h"]),
    "gpt_bigcode": Arch("gpt_bigcode", ["c_attn"], ["c_fc", "mlp.c_proj"]),
    "t5": Arch("t5", ["q", "v"], ["wi", "wo"], kind="seq2seq"),
    "bart": Arch("bart", ["q_proj", "v_proj"], ["fc1", "fc2"], kind="seq2seq"),
    "bert": Arch("bert", ["query", "value"], ["intermediate.dense"], kind="masked"),
    "mixtral": Arch("mixtral", ["q_proj", "v_proj"], [], params=MOE_PARAMS),
    "qwen3_moe": Arch("qwen3_moe", ["q_proj", "o_proj"], [], params=MOE_PARAMS),
}


def make_config(arch: str, hidden: int = 32, layers: int = 2):
    import transformers as tf

    ids = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    dec = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
               max_position_embeddings=64, **ids)
    gqa = dict(num_key_value_heads=2, **dec)
    if arch == "llama":
        return tf.LlamaConfig(**gqa)
    if arch == "qwen2":
        return tf.Qwen2Config(**gqa)
    if arch == "phi3":
        return tf.Phi3Config(**gqa)
    if arch == "mistral":
        return tf.MistralConfig(**gqa)
    if arch == "gemma":
        return tf.GemmaConfig(head_dim=hidden // 4, **gqa)
    if arch == "gemma2":
        return tf.Gemma2Config(head_dim=hidden // 4, sliding_window=4, **gqa)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**dec)
    if arch == "falcon":
        return tf.FalconConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, **ids)
    if arch == "bloom":
        return tf.BloomConfig(hidden_size=hidden, n_layer=layers, n_head=4, **ids)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, **ids)
    if arch == "gpt_bigcode":
        return tf.GPTBigCodeConfig(n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, **ids)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                            word_embed_proj_dim=hidden, max_position_embeddings=64, **ids)
    if arch == "t5":
        return tf.T5Config(d_model=hidden, d_kv=hidden // 4, d_ff=2 * hidden, num_layers=layers, num_heads=4,
                           decoder_start_token_id=PAD, **ids)
    if arch == "bart":
        return tf.BartConfig(d_model=hidden, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden,
                             max_position_embeddings=64, decoder_start_token_id=EOS, forced_eos_token_id=None, **ids)
    if arch == "bert":
        return tf.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                             intermediate_size=2 * hidden, max_position_embeddings=64, **ids)
    if arch == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **gqa)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(head_dim=hidden // 4, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=hidden, **gqa)
    raise ValueError(arch)


def make_model(arch: str, seed: int = 0, **kw):
    import transformers as tf

    auto = {"causal": tf.AutoModelForCausalLM, "seq2seq": tf.AutoModelForSeq2SeqLM,
            "masked": tf.AutoModelForMaskedLM}[ARCHS[arch].kind if arch in ARCHS else "causal"]
    torch.manual_seed(seed)
    model = auto.from_config(make_config(arch, **kw)).eval()
    if ARCHS.get(arch) is not None and ARCHS[arch].params:
        # transformers' default experts implementation (grouped_mm) multiplies each expert's tokens
        # as one GEMM, so a row's rounding depends on the other rows of its batch, in the unpatched
        # model too; batched_mm is row-independent, which makes base rows of a mixed batch
        # comparable bit for bit (test_hf_coverage.py covers grouped_mm, the default).
        model.set_experts_implementation("batched_mm")
    return model


def lora_configs(arch: str) -> Dict[str, "object"]:
    from peft import LoraConfig

    a = ARCHS[arch]
    fifo = dict(fan_in_fan_out=a.fan_in_fan_out, init_lora_weights=False)
    # an MoE model's mlp adapter: LoRA on the fused expert weights (target_parameters), plus o_proj
    mlp = dict(target_modules=list(a.mlp)) if a.mlp else dict(target_modules=["o_proj"], target_parameters=a.params)
    keys = a.mlp_keys
    return {
        "attn": LoraConfig(r=4, lora_alpha=8, target_modules=list(a.attn), layers_to_transform=[1], **fifo),
        "mlp": LoraConfig(r=8, lora_alpha=16, use_rslora=True, **mlp, **fifo),
        "mix": LoraConfig(r=6, lora_alpha=12, target_modules="all-linear", rank_pattern={a.attn[0]: 2, keys[-1]: 10},
                          alpha_pattern={a.attn[0]: 3, keys[0]: 20}, **fifo),
    }


def save_adapter(base, lora_config, path: str, seed: int) -> str:
    """PEFT-save an adapter with random weights for ``base`` (which is not modified)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(copy.deepcopy(base), lora_config).save_pretrained(path)
    return path


def save_adapters(base, configs: Dict[str, object], root: str, seed: int = 100) -> Dict[str, str]:
    return {n: save_adapter(base, c, os.path.join(root, n), seed + i) for i, (n, c) in enumerate(configs.items())}


def peft_model(base, path: str):
    """PEFT's own model with the adapter at ``path`` alone (the reference)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def left_padded_batch(lengths: List[int], seq: Optional[int] = None, seed: int = 0):
    """input_ids / attention_mask [B, seq] with rows left-padded to ``seq``."""
    g = torch.Generator().manual_seed(seed)
    seq = seq or max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), seq), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, seq - n:] = 1
    ids[mask == 0] = PAD
    return ids, mask


def batch_inputs(arch: str, lengths: List[int], seed: int = 0):
    """(forward kwargs, keep [B, L] bool: the output positions to compare) for a left-padded batch:
    decoder-only and encoder models compare their non-padding positions; encoder-decoder models
    get 4 decoder tokens per row (all compared)."""
    ids, mask = left_padded_batch(lengths, seed=seed)
    kw = dict(input_ids=ids, attention_mask=mask)
    if ARCHS[arch].kind != "seq2seq":
        return kw, mask.bool()
    g = torch.Generator().manual_seed(seed + 1000)
    dec = torch.randint(3, VOCAB, (len(lengths), 4), generator=g)
    dec[:, 0] = make_config(arch).decoder_start_token_id
    kw["decoder_input_ids"] = dec
    return kw, torch.ones_like(dec, dtype=torch.bool)


def warm_up_groups(lm, arch: str) -> None:
    """One base-rows forward, in which a patched model finds its projection groups (hf_groups.py):
    every later forward of the tests then runs grouped (q/k/v, gate/up: one launch each)."""
    kw, _ = batch_inputs(arch, [3, 2], seed=99)
    with torch.no_grad():
        lm(adapter_names=[None, None], **kw)
    assert all(g.bound.plans is not None for g, _ in lm._groups.values())


# float32 on CPU: the delta is computed in another order than PEFT's (batched GEMMs vs one
# nn.Linear per adapter), so results agree to float32 rounding, amplified a little by 2 layers.
ATOL, RTOL = 2e-5, 2e-5
