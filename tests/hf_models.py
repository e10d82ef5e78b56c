"""Tiny random-init Hugging Face models and PEFT-saved adapters for the patching tests (no hub).

Each architecture lists, as test data, the module names its three adapters target:

    attn   r=4,  alpha 8,   attention projections of layer 1 only (layers_to_transform)
    mlp    r=8,  alpha 16,  MLP projections, rsLoRA (scaling alpha / sqrt(r))
    mix    r=6,  alpha 12,  "all-linear", rank_pattern and alpha_pattern on two modules

PEFT writes them with ``save_pretrained`` (random A and B: ``init_lora_weights=False``), so the
files are exactly what users have. The reference for a row that uses adapter ``n`` is a PEFT model
holding adapter ``n`` alone, run on the same batch.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2


@dataclass(frozen=True)
class Arch:
    name: str
    attn: List[str]          # attention modules (suffixes)
    mlp: List[str]           # MLP modules (suffixes)
    fan_in_fan_out: bool = False


ARCHS: Dict[str, Arch] = {
    "llama": Arch("llama", ["q_proj", "v_proj"], ["gate_proj", "down_proj"]),
    "qwen2": Arch("qwen2", ["q_proj", "k_proj", "o_proj"], ["up_proj", "down_proj"]),
    "gpt2": Arch("gpt2", ["c_attn"], ["c_fc", "mlp.c_proj"], fan_in_fan_out=True),
    "phi3": Arch("phi3", ["qkv_proj", "o_proj"], ["gate_up_proj", "down_proj"]),
    "gpt_neox": Arch("gpt_neox", ["query_key_value", "dense"], ["dense_h_to_4h", "dense_4h_to_h"]),
    "opt": Arch("opt", ["q_proj", "v_proj"], ["fc1", "fc2"]),
}


def make_config(arch: str, hidden: int = 32, layers: int = 2):
    import transformers as tf

    ids = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    dec = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
               max_position_embeddings=64, **ids)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **dec)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **dec)
    if arch == "phi3":
        return tf.Phi3Config(num_key_value_heads=2, **dec)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**dec)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, **ids)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                            word_embed_proj_dim=hidden, max_position_embeddings=64, **ids)
    raise ValueError(arch)


def make_model(arch: str, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(make_config(arch, **kw)).eval()


def lora_configs(arch: str) -> Dict[str, "object"]:
    from peft import LoraConfig

    a = ARCHS[arch]
    fifo = dict(fan_in_fan_out=a.fan_in_fan_out, init_lora_weights=False)
    return {
        "attn": LoraConfig(r=4, lora_alpha=8, target_modules=list(a.attn), layers_to_transform=[1], **fifo),
        "mlp": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=list(a.mlp), **fifo),
        "mix": LoraConfig(r=6, lora_alpha=12, target_modules="all-linear", rank_pattern={a.attn[0]: 2, a.mlp[-1]: 10},
                          alpha_pattern={a.attn[0]: 3, a.mlp[0]: 20}, **fifo),
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


# float32 on CPU: the delta is computed in another order than PEFT's (batched GEMMs vs one
# nn.Linear per adapter), so results agree to float32 rounding, amplified a little by 2 layers.
ATOL, RTOL = 2e-5, 2e-5
