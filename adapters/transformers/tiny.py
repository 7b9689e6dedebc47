"""Tiny random models of any transformers model type, built from its config class (no downloads).

``tiny_config("gemma2")`` takes the config class's defaults and shrinks every size field it knows
(layers, widths, heads, experts, vocabulary, positions) so the model builds and runs on a CPU in
well under a second; ``tiny_model`` builds it with seeded random weights. ``crosspatch verify
--config TYPE`` and ``make coverage`` use them, and the tests build named families with them.
"""

from __future__ import annotations

from typing import Any

import torch

from .infer import config_int

__all__ = ["TASKS", "tiny_config", "tiny_model", "model_types"]

#: Sizes of the shrunk model: small, but with more than one head, key/value groups, and layers.
_SIZES: dict[str, int] = {
    # depth
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "num_decoder_layers": 2,
    "encoder_layers": 2, "decoder_layers": 2,
    # width
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "embed_dim": 64,
    "word_embed_proj_dim": 64, "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "ffn_hidden_size": 128, "d_ff": 128,
    "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "hidden_dim": 128,
    # heads
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "d_kv": 16, "kv_channels": 16, "rotary_dim": 8,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 32,
    # mixture of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_intermediate_size": 32, "expert_intermediate_size": 32,
    "shared_expert_intermediate_size": 64, "n_group": 2, "topk_group": 1,
    # vocabulary and positions
    "vocab_size": 128, "max_position_embeddings": 64, "n_positions": 64, "max_seq_len": 64,
    "image_size": 32, "patch_size": 8,
}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id")

#: The auto mappings a tiny model can be built for, by task.
TASKS = ("causal-lm", "masked-lm", "seq2seq-lm", "image-classification")


def _mapping(task: str) -> dict[str, str]:
    from transformers.models.auto import modeling_auto as auto

    names = {
        "causal-lm": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "masked-lm": auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        "seq2seq-lm": auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        "image-classification": auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    }
    if task not in names:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return dict(names[task])


def model_types(task: str = "causal-lm") -> list[str]:
    """Every model type transformers maps for ``task``, sorted."""
    return sorted(_mapping(task))


def _depth(config: Any) -> int | None:
    return config_int(config, ("num_hidden_layers", "n_layer", "num_layers"))


#: Per-head widths a model may read interchangeably (MLA's rotary part is its ``head_dim``): those equal
#: in the defaults stay equal after shrinking, and ``qk_head_dim`` stays the sum of its parts.
_HEAD_WIDTHS = ("head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "rotary_dim", "kv_channels", "d_kv")


def _tie_head_widths(config: Any, before: dict[str, Any]) -> None:
    for i, a in enumerate(_HEAD_WIDTHS):
        for b in _HEAD_WIDTHS[i + 1:]:
            if isinstance(before.get(a), int) and before.get(a) == before.get(b):
                small = min(getattr(config, a), getattr(config, b))
                for key in (a, b):
                    _set(config, key, small)
    if isinstance(before.get("kv_lora_rank"), int) and isinstance(getattr(config, "num_key_value_heads", None), int):
        _set(config, "num_key_value_heads", config.num_attention_heads)  # latent attention: a key and value per head
    nope, rope, qk = (before.get(k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "qk_head_dim"))
    if isinstance(qk, int) and isinstance(nope, int) and isinstance(rope, int) and qk == nope + rope:
        _set(config, "qk_head_dim", config.qk_nope_head_dim + config.qk_rope_head_dim)


def _fill_unset(config: Any) -> None:
    """Sizes a config leaves None for the model to read anyway (``head_dim``, the key/value heads, a mixture's
    experts and top-k) set to the shrunk model's."""
    heads, width = config_int(config, ("num_attention_heads",)), config_int(config, ("hidden_size",))
    fills: dict[str, int] = {"num_key_value_heads": min(2, heads or 2)}
    if heads and width:
        fills["head_dim"] = width // heads
    if any(key in vars(config) for key in ("num_experts", "n_routed_experts", "num_local_experts")):
        fills.update(n_routed_experts=_SIZES["n_routed_experts"], num_experts_per_tok=_SIZES["num_experts_per_tok"], n_shared_experts=1)
    for key, value in fills.items():
        if key in vars(config) and _get(config, key) is None:
            _set(config, key, value)


def _get(config: Any, key: str) -> Any:
    try:
        return getattr(config, key, None)
    except Exception:  # a per-layer attribute (read through the layer configs)
        return None


def _set(config: Any, key: str, value: Any) -> None:
    try:
        setattr(config, key, value)
    except Exception:  # a read-only or validated field: keep it
        pass


def _shrink(config: Any) -> None:
    before = _depth(config)
    widths = {k: _get(config, k) for k in (*_HEAD_WIDTHS, "qk_head_dim", "kv_lora_rank")}
    for key, size in _SIZES.items():
        try:
            value = getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > size:
                setattr(config, key, size)
        except Exception:  # a per-layer attribute, a read-only or validated field: keep the default
            pass
    _tie_head_widths(config, widths)
    _fill_unset(config)
    depth = _depth(config)
    if before and depth and depth < before:  # per-layer lists (GPT-Neo's attention_layers ...) follow the depth
        for key, value in list(vars(config).items()):
            if key != "layer_types" and isinstance(value, (list, tuple)) and len(value) == before:
                setattr(config, key, type(value)(value[:depth]))
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        for key in _TOKEN_IDS:
            value = getattr(config, key, None)
            if isinstance(value, int) and value >= vocab:
                setattr(config, key, vocab - 1 - _TOKEN_IDS.index(key))
    layers = getattr(config, "layer_types", None)
    if isinstance(layers, (list, tuple)) and isinstance(depth, int) and len(layers) > depth:
        # Keep one layer of each kind the model mixes (sliding and full attention) where it has both.
        kinds = list(dict.fromkeys(layers))
        config.layer_types = (kinds * depth)[:depth] if len(kinds) > 1 else list(layers[:depth])
    if getattr(config, "sliding_window", None) and isinstance(config.sliding_window, int):
        config.sliding_window = min(config.sliding_window, 4)
    for sub in ("text_config", "vision_config", "encoder", "decoder"):
        inner = getattr(config, sub, None)
        if inner is not None and hasattr(inner, "to_dict"):
            _shrink(inner)


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """The config class of ``model_type`` with its defaults shrunk, then ``overrides`` applied."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown model type {model_type!r}; transformers knows {len(CONFIG_MAPPING)} (e.g. llama, gemma2)")
    config = CONFIG_MAPPING[model_type]()
    _shrink(config)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _for_class(config: Any, cls: type) -> Any:
    """``config``, or its sub-config the model class is built from (Qwen3.5's causal LM takes the text
    config of the composite config its model type names)."""
    wanted = getattr(cls, "config_class", None)
    if not isinstance(wanted, type) or isinstance(config, wanted):
        return config
    for name in ("text_config", "decoder", "language_config", "text_encoder"):
        inner = getattr(config, name, None)
        if isinstance(inner, wanted):
            return inner
    return config


def tiny_model(model_type: str, task: str = "causal-lm", seed: int = 0, **overrides: Any) -> Any:
    """A tiny ``model_type`` for ``task`` with seeded random weights, in eval mode."""
    import transformers

    mapping = _mapping(task)
    if model_type not in mapping:
        raise ValueError(f"transformers has no {task} model for {model_type!r}")
    names = mapping[model_type]
    cls = getattr(transformers, names if isinstance(names, str) else names[0])  # DeiT maps to two classes: the first
    config = _for_class(tiny_config(model_type, **overrides), cls)
    torch.manual_seed(seed)
    return cls(config).eval()
