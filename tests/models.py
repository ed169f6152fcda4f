"""Tiny random Hugging Face language models of every supported family, built offline.

Every test of the project that needs a model takes it from here, so that all of them see
the same shapes: ``num_layers`` layers, ``hidden`` = d_model, ``d_mlp`` neurons per layer,
``vocab`` tokens. Nothing is downloaded: each model is built from its config in-process.

Hugging Face initializes weights with std 0.02, which makes every MLP activation tiny and
near zero; :func:`tiny_model` re-initializes the weights at unit scale (deterministically
from ``seed``) so that gate and in values are O(1) and all four sign cases occur.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: The gated-MLP families gatescope supports, one tiny model each.
FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "olmo",
    "olmo2",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "granite",
)

#: Variants beyond FAMILIES: Llama with biases on its MLP projections (``mlp_bias=True``).
VARIANTS: tuple[str, ...] = ("llama_bias",)

#: The mixture-of-experts families transformers ships (experts as one module of 3-D weights).
MOE_FAMILIES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "granitemoe",
    "granitemoeshared",
    "phimoe",
    "gpt_oss",
)

#: Models without a gated MLP, for the error paths.
NON_GATED: tuple[str, ...] = ("gpt2", "gpt_neox")

# Token ids kept inside every tiny vocabulary (the defaults of some configs, e.g. Phi-3's pad
# id 32000, would not fit in 128 tokens).
_BOS, _EOS = 1, 2


def _config(
    family: str,
    *,
    num_layers: int,
    hidden: int,
    d_mlp: int,
    vocab: int,
    max_positions: int,
):
    """The config of a tiny model of ``family``."""
    import transformers

    # 4 query heads and 2 key/value heads (grouped-query attention wherever the family has it).
    heads, kv_heads = 4, 2
    if hidden % heads:
        raise ValueError(f"hidden={hidden} must be a multiple of {heads} heads")
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=d_mlp,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=_BOS,
        eos_token_id=_EOS,
        pad_token_id=None,
    )
    gqa = dict(num_key_value_heads=kv_heads, head_dim=hidden // heads)
    if family in ("llama", "llama_bias"):
        return transformers.LlamaConfig(**common, **gqa, mlp_bias=family == "llama_bias")
    if family == "mistral":
        return transformers.MistralConfig(**common, **gqa)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, num_key_value_heads=kv_heads)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, **gqa)
    if family == "olmo":
        return transformers.OlmoConfig(**common, num_key_value_heads=kv_heads)
    if family == "olmo2":
        return transformers.Olmo2Config(**common, num_key_value_heads=kv_heads)
    if family == "gemma":
        return transformers.GemmaConfig(**common, **gqa)
    if family == "gemma2":
        return transformers.Gemma2Config(**common, **gqa)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**common, **gqa)
    if family == "phi3":
        return transformers.Phi3Config(**common, num_key_value_heads=kv_heads)
    if family == "granite":
        return transformers.GraniteConfig(**common, num_key_value_heads=kv_heads)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES + VARIANTS}")


def _reinit(model: nn.Module, seed: int) -> None:
    """Re-initialize every weight at unit scale, deterministically from ``seed``.

    Linear weights get N(0, 1/fan_in) so that each projection keeps its input's scale,
    biases N(0, 0.1^2), embeddings N(0, 0.5^2). Norm weights keep their (identity) init.
    A tied unembedding is the embedding itself, so it is visited once, as an embedding.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                fan_in = module.weight.shape[1]
                _normal_(module.weight, 1.0 / math.sqrt(fan_in), generator)
                if module.bias is not None:
                    _normal_(module.bias, 0.1, generator)
            # Experts' 3-D weights [expert, out, in] ([expert, in, out] where transposed) and
            # their [expert, out] biases.
            for name, weight in module.named_parameters(recurse=False):
                if weight.dim() == 3:
                    fan_in = weight.shape[1 if getattr(module, "is_transposed", False) else 2]
                    _normal_(weight, 1.0 / math.sqrt(fan_in), generator)
                elif weight.dim() == 2 and name.endswith("_bias"):
                    _normal_(weight, 0.1, generator)
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                _normal_(module.weight, 0.5, generator)


def _normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    # Drawn in float32 on the CPU, so the same seed gives the same weights in every dtype.
    values = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std
    tensor.copy_(values)


def tiny_model(
    family: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 2,
    hidden: int = 32,
    d_mlp: int = 64,
    vocab: int = 128,
    max_positions: int = 128,
):
    """A tiny random ``*ForCausalLM`` of ``family``, in eval mode.

    Args:
        family: One of :data:`FAMILIES` or :data:`VARIANTS`.
        seed: Seeds the initialization; the same seed gives the same weights.
        dtype: Parameter dtype (float64 for tight equality checks).
        num_layers: Number of decoder layers.
        hidden: d_model, a multiple of 4 (4 heads of ``hidden // 4`` dimensions).
        d_mlp: Neurons per MLP layer (intermediate_size).
        vocab: Vocabulary size; token ids 1 and 2 are BOS and EOS, there is no pad id.
        max_positions: Maximum sequence length.

    Returns:
        A ``transformers.PreTrainedModel`` whose MLP gate and in values are O(1).
    """
    from transformers import AutoModelForCausalLM

    config = _config(
        family,
        num_layers=num_layers,
        hidden=hidden,
        d_mlp=d_mlp,
        vocab=vocab,
        max_positions=max_positions,
    )
    torch.manual_seed(seed)
    # Eager attention runs for every family on the CPU and is the reference implementation.
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _reinit(model, seed)
    return model.to(dtype).eval()


def tiny_moe_model(
    family: str, *, seed: int = 0, num_layers: int = 2, experts: int = 4, d_ff: int = 32
):
    """A tiny random mixture-of-experts ``*ForCausalLM`` of ``family`` (one of
    :data:`MOE_FAMILIES`): ``experts`` routed experts of ``d_ff`` neurons per layer, two per
    token; shared experts of 48 neurons where the family has them; DeepSeek's first layer
    dense (64 neurons), as in the real models. Weights at unit scale, as :func:`tiny_model`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    routed = dict(num_experts_per_tok=2, moe_intermediate_size=d_ff)
    mla = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
               v_head_dim=8)  # fmt: skip
    extra = {
        "mixtral": dict(num_local_experts=experts),
        "qwen2_moe": dict(num_experts=experts, shared_expert_intermediate_size=48),
        "qwen3_moe": dict(num_experts=experts),
        "olmoe": dict(num_experts=experts),
        "deepseek_v2": dict(n_routed_experts=experts, first_k_dense_replace=1,
                            n_shared_experts=1, **mla),
        "deepseek_v3": dict(n_routed_experts=experts, first_k_dense_replace=1, n_group=1,
                            topk_group=1, n_shared_experts=1, **mla),
        "granitemoe": dict(num_local_experts=experts),
        "granitemoeshared": dict(num_local_experts=experts, shared_intermediate_size=48),
        "phimoe": dict(num_local_experts=experts),
        "gpt_oss": dict(num_local_experts=experts),
    }  # fmt: skip
    if family not in extra:
        raise ValueError(f"unknown family {family!r}; choose from {MOE_FAMILIES}")
    # Families without moe_intermediate_size size their experts by intermediate_size.
    uses_intermediate = family in ("mixtral", "olmoe", "granitemoe", "granitemoeshared",
                                   "phimoe", "gpt_oss")  # fmt: skip
    config = AutoConfig.for_model(
        family, vocab_size=128, hidden_size=32, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=4 if family.startswith("deepseek") else 2,
        head_dim=8, max_position_embeddings=128,
        intermediate_size=d_ff if uses_intermediate else 64, bos_token_id=_BOS,
        eos_token_id=_EOS, pad_token_id=None, **routed, **extra[family],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # transformers' eager experts: the reference implementation, in every dtype (grouped_mm
    # refuses float64).
    model.set_experts_implementation("eager")
    _reinit(model, seed)
    return model.eval()


def tiny_non_gated(family: str, *, seed: int = 0, num_layers: int = 2):
    """A tiny random model without a gated MLP: ``"gpt2"`` or ``"gpt_neox"`` (Pythia).

    Args:
        family: One of :data:`NON_GATED`.
        seed: Seeds the initialization.
        num_layers: Number of decoder layers.

    Returns:
        A ``transformers.PreTrainedModel`` in eval mode.
    """
    import transformers

    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=128,
            n_positions=128,
            n_embd=32,
            n_layer=num_layers,
            n_head=4,
            bos_token_id=_BOS,
            eos_token_id=_EOS,
        )
    elif family == "gpt_neox":
        config = transformers.GPTNeoXConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            max_position_embeddings=128,
            bos_token_id=_BOS,
            eos_token_id=_EOS,
        )
    else:
        raise ValueError(f"unknown non-gated family {family!r}; choose from {NON_GATED}")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()
