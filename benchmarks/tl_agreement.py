"""crosspatch against TransformerLens on identical weights, family by family.

Run from the bench venv (``make tl-agreement``, also part of ``make bench``):
``.venv-bench/bin/python benchmarks/tl_agreement.py``. Writes ``benchmarks/tl_agreement.md`` and
prints the same table; exits non-zero when crosspatch disagrees with its reference beyond 1e-4.

For every family a tiny random model is built from its config class
(``crosspatch.adapters.transformers.tiny.tiny_model``, ``initializer_range`` 0.1 so effects are far
above float error; nothing is downloaded, ``HF_HUB_OFFLINE=1``). TransformerLens 3.9 gets the same
weights through its own conversion (``loading_from_pretrained.get_pretrained_state_dict`` with the HF
model object, which dispatches to ``convert_*_weights``), loaded without folding or centering:

* where TransformerLens builds its config from the HF config (``convert_hf_model_config``: Llama,
  GPT-NeoX, Mistral, Qwen2, Qwen3, Phi-3, GPT-J, GPT-Neo, Mixtral) it reads the model's config
  written to a local folder, so its own mapping of the HF fields is what is tested;
* where its config is keyed by checkpoint name (Gemma 1/2/3, OLMo, OLMo-2), or its builder reads a
  field transformers 5 no longer has (GPT-2: ``n_ctx``; Phi: ``partial_rotary_factor``, now in
  ``rope_parameters``; the failure is reported), the HookedTransformerConfig is written here from the
  HF config with the fields TransformerLens's entries for those architectures set.

When TransformerLens loads the model and its logits equal HF's within 1e-4, crosspatch is compared
with it (denoising: the corrupt run with the clean activation patched in; logit difference at the last
position, mean over prompts, minus the corrupt run's):

* ``resid_pre.*[pos=*]`` vs ``patching.get_act_patch_resid_pre``;
* ``head_out.*[head=*]`` (a head's write, every position) vs ``get_act_patch_attn_head_out_all_pos``
  (``hook_z`` of the head, every position: the write is linear in it);
* ``mlp_out.*`` (the layer's MLP write, every position) vs ``blocks.l.hook_mlp_out`` replaced whole;
* ``attribution_patching(..., "head_out.*[head=*]")`` vs gradient x (clean - corrupt) on ``hook_z``.

Every family is also checked against hand-written hooks: plain torch hooks on the HF modules (the block
list, the attention output projection, the module whose output is the MLP's write into the residual),
named here by hand, not taken from crosspatch's mapping. For families TransformerLens cannot load, or
whose logits differ from HF's, those hooks are the reference.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import copy
import datetime
import logging
import platform
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch

TOL = 1e-4
VOCAB_USED = 100  # token ids drawn below this (every tiny vocabulary has 128)
HERE = os.path.dirname(os.path.abspath(__file__))
logging.getLogger("kernels").setLevel(logging.ERROR)  # "hub is offline" notes from transformers' kernel lookup


@dataclass
class Family:
    model_type: str
    role: str  # "control", "table" or "inferred"
    blocks: str  # the block list, from the top model
    o_proj: str  # attention output projection, from a block: its input holds the heads side by side
    mlp_write: str  # module whose output is the MLP's write into the residual, from a block
    tl: str | None  # "auto": TransformerLens's config builder; "manual": written here; None: no conversion
    overrides: dict = field(default_factory=dict)
    note: str = ""
    label: str = ""  # the table's name for the row (default: the model type)
    if_fails: str = ""  # what is known about the cause, said when crosspatch does not agree


FAMILIES = [
    Family("gpt2", "control", "transformer.h", "attn.c_proj", "mlp", "auto"),
    Family("llama", "control", "model.layers", "self_attn.o_proj", "mlp", "auto"),
    Family("gpt_neox", "table", "gpt_neox.layers", "attention.dense", "mlp", "auto"),
    Family("mistral", "table", "model.layers", "self_attn.o_proj", "mlp", "auto"),
    Family("qwen2", "table", "model.layers", "self_attn.o_proj", "mlp", "auto"),
    Family("gemma", "inferred", "model.layers", "self_attn.o_proj", "mlp", "manual"),
    Family(
        "gemma2", "inferred", "model.layers", "self_attn.o_proj", "post_feedforward_layernorm", "manual",
        if_fails=(
            "Gemma-2 hands its attention function `softcap` (attn_logit_softcapping, tanh on the scores); "
            "crosspatch's own eager attention for patterns (`_pattern_attention`, adapters/transformers/reaches.py) "
            "takes it in **kwargs and never applies it, so a run that reads or writes `attn_pattern` computes another "
            "attention. The proof's self-patch checks take their source from such a run and allow 1e-6 "
            "(adapters/transformers/proof.py), so with these weights every family fails and is dropped"
        ),
    ),
    Family(
        "gemma2", "inferred", "model.layers", "self_attn.o_proj", "post_feedforward_layernorm", "manual",
        {"initializer_range": 0.02}, "transformers' default initializer_range (0.02)", "gemma2 (init 0.02)",
    ),
    Family("gemma3_text", "inferred", "model.layers", "self_attn.o_proj", "post_feedforward_layernorm", "manual"),
    Family("qwen3", "inferred", "model.layers", "self_attn.o_proj", "mlp", "auto"),
    Family(
        "phi", "inferred", "model.layers", "self_attn.dense", "mlp", "auto", {"num_key_value_heads": 4},
        "MHA: TransformerLens's Phi config has no key/value heads (the Phi checkpoints are MHA)",
    ),
    Family("phi3", "inferred", "model.layers", "self_attn.o_proj", "mlp", "auto"),
    Family(
        "olmo", "inferred", "model.layers", "self_attn.o_proj", "mlp", "manual", {"num_key_value_heads": 4},
        "MHA: convert_olmo_weights reshapes K and V with n_heads (the OLMo checkpoints are MHA)",
    ),
    Family(
        "olmo2", "inferred", "model.layers", "self_attn.o_proj", "post_feedforward_layernorm", "manual",
        {"num_key_value_heads": 4},
        "MHA: convert_olmo2_weights reshapes K and V with n_heads (the OLMo-2 checkpoints are MHA)",
    ),
    Family("gptj", "inferred", "transformer.h", "attn.out_proj", "mlp", "auto"),
    Family("gpt_neo", "inferred", "transformer.h", "attn.attention.out_proj", "mlp", "auto"),
    Family("stablelm", "inferred", "model.layers", "self_attn.o_proj", "mlp", None),
    Family("smollm3", "inferred", "model.layers", "self_attn.o_proj", "mlp", None),
    Family("mixtral", "inferred", "model.layers", "self_attn.o_proj", "mlp", "auto"),
    Family("qwen2_moe", "inferred", "model.layers", "self_attn.o_proj", "mlp", None),
]


# --------------------------------------------------------------------------- the pair and the metric
@dataclass
class Pair:
    clean: torch.Tensor
    corrupt: torch.Tensor
    answer: torch.Tensor
    distractor: torch.Tensor

    def metric_rows(self, logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        rows = torch.arange(last.shape[0])
        return last[rows, self.answer] - last[rows, self.distractor]


def make_pair(batch: int, seq: int, seed: int) -> Pair:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB_USED, (batch, seq), generator=gen)
    corrupt = clean.clone()
    corrupt[:, seq // 2] = (corrupt[:, seq // 2] + 1) % VOCAB_USED
    answer = clean[:, -1]
    return Pair(clean, corrupt, answer, (answer + 1) % VOCAB_USED)


def build(family: Family, seed: int):
    from crosspatch.adapters.transformers.tiny import tiny_model

    return tiny_model(family.model_type, seed=seed, **{"initializer_range": 0.1, **family.overrides})


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


# --------------------------------------------------------------------------- crosspatch
def crosspatch_effects(model, pair: Pair, layers: int) -> dict[str, torch.Tensor]:
    import crosspatch as cp
    from crosspatch.methods.attribution import attribution_patching

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = cp.wrap(model)
    metric = cp.metrics.logit_diff(pair.answer, pair.distractor)

    def sweep(pattern):
        r = cp.activation_patching(m, pair.clean, pair.corrupt, pattern, metric, progress=False)
        return torch.as_tensor(r.values).reshape(layers, -1)

    def atp():
        r = attribution_patching(m, pair.clean, pair.corrupt, "head_out.*[head=*]", metric)
        return torch.as_tensor(r.values).reshape(layers, -1)

    out = {}
    for method, fn in (("resid_pre", lambda: sweep("resid_pre.*[pos=*]")), ("head_out", lambda: sweep("head_out.*[head=*]")),
                       ("mlp_out", lambda: sweep("mlp_out.*").reshape(layers)), ("atp", atp)):
        try:
            out[method] = fn()
        except cp.SiteError as exc:  # a family crosspatch does not serve on this model: reported, not compared
            out[method] = f"not served ({exc})"
    return out


def pattern_capture_drift(model, pair: Pair) -> float | None:
    """max |logits of a crosspatch run capturing every attention pattern - HF's logits| (None: no patterns)."""
    import crosspatch as cp

    m = cp.wrap(model)
    if "attn_pattern" not in m.catalog:
        return None
    out = m.run(pair.clean, capture=["attn_pattern.*"]).output
    return float((out - hf_logits(model, pair.clean)).abs().max())


# --------------------------------------------------------------------------- TransformerLens
def _rope_theta(config, layer_type: str | None = None) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _manual_config(model) -> dict:
    """The HookedTransformerConfig fields TransformerLens sets for its named Gemma / OLMo checkpoints (and its
    GPT-2 and Phi entries), read from this model's HF config instead of hard-coded for one checkpoint."""
    c = model.config
    kind = c.model_type
    if kind == "gpt2":  # as benchmarks/peers.py builds it
        return {
            "n_layers": c.n_layer, "d_model": c.n_embd, "n_heads": c.n_head, "d_head": c.n_embd // c.n_head,
            "d_mlp": c.n_inner or 4 * c.n_embd, "d_vocab": c.vocab_size, "n_ctx": c.n_positions,
            "act_fn": c.activation_function, "normalization_type": "LN", "eps": c.layer_norm_epsilon,
            "positional_embedding_type": "standard", "original_architecture": type(model).__name__,
        }
    if kind == "phi":  # TransformerLens's PhiForCausalLM entry, partial_rotary_factor read where transformers 5 keeps it
        d_head = c.hidden_size // c.num_attention_heads
        factor = (getattr(c, "rope_parameters", None) or {}).get("partial_rotary_factor", 0.5)
        return {
            "d_model": c.hidden_size, "d_head": d_head, "n_heads": c.num_attention_heads, "d_mlp": c.intermediate_size,
            "n_layers": c.num_hidden_layers, "n_ctx": c.max_position_embeddings, "eps": c.layer_norm_eps,
            "d_vocab": c.vocab_size, "act_fn": c.hidden_act, "normalization_type": "LN",
            "positional_embedding_type": "rotary", "rotary_base": _rope_theta(c), "use_attn_scale": True,
            "parallel_attn_mlp": True, "rotary_dim": round(factor * d_head), "original_architecture": type(model).__name__,
        }
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    act = getattr(c, "hidden_activation", None) or c.hidden_act
    base = {
        "d_model": c.hidden_size, "d_head": d_head, "n_heads": c.num_attention_heads, "d_mlp": c.intermediate_size,
        "n_layers": c.num_hidden_layers, "n_ctx": c.max_position_embeddings, "d_vocab": c.vocab_size,
        "act_fn": act, "positional_embedding_type": "rotary", "rotary_dim": d_head,
        "rotary_base": _rope_theta(c), "gated_mlp": True, "original_architecture": type(model).__name__,
    }
    if kind in ("gemma", "gemma2", "gemma3_text"):
        base.update(normalization_type="RMS", eps=c.rms_norm_eps, final_rms=True, use_attn_scale=True,
                    n_key_value_heads=c.num_key_value_heads)
    if kind in ("gemma2", "gemma3_text"):
        local = ["local" if t == "sliding_attention" else "global" for t in c.layer_types]
        base.update(
            use_normalization_before_and_after=True, window_size=c.sliding_window, use_local_attn=True,
            attn_types=local, attn_scale=float(c.query_pre_attn_scalar) ** 0.5,
            attn_scores_soft_cap=c.attn_logit_softcapping or -1.0, output_logits_soft_cap=c.final_logit_softcapping or -1.0,
        )
    if kind == "gemma3_text":
        base.update(use_qk_norm=True, rotary_base=_rope_theta(c, "full_attention"),
                    rotary_base_local=_rope_theta(c, "sliding_attention"))
    if kind == "olmo":  # OLMo's layer norm has no parameters: TransformerLens loads ones and zeros
        base.update(normalization_type="LN", eps=1e-5, attn_types=["global"] * c.num_hidden_layers,
                    clip_qkv=getattr(c, "clip_qkv", None))
    if kind == "olmo2":
        base.update(normalization_type="RMS", eps=c.rms_norm_eps, attn_types=["global"] * c.num_hidden_layers)
    return base


MANUAL = ("gpt2", "phi", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2")  # what _manual_config can write


def hooked_transformer(family: Family, model, notes: list[str]):
    """``model``'s weights in a HookedTransformer, converted by TransformerLens's own functions.

    With ``tl="auto"`` TransformerLens's config builder reads the HF config; if it fails and the config
    can be written here, that is said in ``notes`` and the written one is used."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading

    with tempfile.TemporaryDirectory(prefix="tl_agreement_") as folder:
        # the folder name must not say "llama" or "gemma": TransformerLens routes those names to fixed configs
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(folder)
        cfg_dict = None
        if family.tl == "auto":
            try:
                cfg_dict = loading.convert_hf_model_config(folder)
            except Exception as exc:  # noqa: BLE001
                if family.model_type not in MANUAL:
                    raise
                notes.append(f"TransformerLens's config builder fails ({type(exc).__name__}: {exc}); "
                             "HookedTransformerConfig written here")
        if cfg_dict is None:
            cfg_dict = _manual_config(model)
        # what get_pretrained_model_config adds, minus the hub: float32, CPU, no tokenizer
        cfg_dict.update(
            model_name=family.model_type, init_weights=False, dtype=torch.float32, device="cpu", n_devices=1,
            default_prepend_bos=False, from_checkpoint=False, tokenizer_name=None, d_vocab=model.config.vocab_size,
        )
        if cfg_dict["original_architecture"] == "Qwen2ForCausalLM":
            cfg_dict["rotary_base"] = _rope_theta(model.config)
        cfg = HookedTransformerConfig.from_dict(cfg_dict)
        state = loading.get_pretrained_state_dict(folder, cfg, model, dtype=torch.float32)
    tl = HookedTransformer(cfg, move_to_device=False)
    tl.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return tl.eval()


def tl_effects(tl, pair: Pair) -> dict[str, torch.Tensor]:
    from transformer_lens import patching

    patching.tqdm = lambda iterable, **kwargs: iterable
    with torch.no_grad():
        base = pair.metric_rows(tl(pair.corrupt)).mean()
        _, cache = tl.run_with_cache(pair.clean)

    def metric(logits):
        return pair.metric_rows(logits).mean() - base

    out = {}
    with torch.no_grad():
        out["resid_pre"] = patching.get_act_patch_resid_pre(tl, pair.corrupt, cache, metric)
        out["head_out"] = patching.get_act_patch_attn_head_out_all_pos(tl, pair.corrupt, cache, metric)
        mlp = []
        for layer in range(tl.cfg.n_layers):
            name = f"blocks.{layer}.hook_mlp_out"
            logits = tl.run_with_hooks(pair.corrupt, fwd_hooks=[(name, lambda act, hook: cache[hook.name])])
            mlp.append(metric(logits))
        out["mlp_out"] = torch.stack(mlp)

    # AtP as in TransformerLens's attribution-patching demo: hook_z and its gradient on the corrupt run
    is_z = lambda name: name.endswith("attn.hook_z")  # noqa: E731
    acts, grads = {}, {}
    tl.reset_hooks()
    tl.add_hook(is_z, lambda act, hook: acts.__setitem__(hook.name, act.detach()), "fwd")
    tl.add_hook(is_z, lambda grad, hook: grads.__setitem__(hook.name, grad.detach()), "bwd")
    try:
        pair.metric_rows(tl(pair.corrupt)).sum().backward()
    finally:
        tl.reset_hooks()
        tl.zero_grad(set_to_none=True)
    out["atp"] = torch.stack([
        ((cache[f"blocks.{l}.attn.hook_z"] - acts[f"blocks.{l}.attn.hook_z"]) * grads[f"blocks.{l}.attn.hook_z"])
        .sum(dim=(1, 3)).mean(dim=0)
        for l in range(tl.cfg.n_layers)
    ])
    return out


# --------------------------------------------------------------------------- hand-written hooks
def _hidden(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _with_hidden(args, kwargs, h):
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": h}
    return (h, *args[1:]), kwargs


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


class Hooks:
    """Plain torch hooks on ``model``'s own modules."""

    def __init__(self, family: Family, model, n_heads: int):
        self.model = model
        self.blocks = list(model.get_submodule(family.blocks))
        self.o_proj = [b.get_submodule(family.o_proj) for b in self.blocks]
        self.mlp = [b.get_submodule(family.mlp_write) for b in self.blocks]
        self.n_heads = n_heads

    def _run(self, tokens, hooks, grad=False):
        handles = []
        try:
            for module, kind, fn in hooks:
                if kind == "pre":
                    handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(fn))
            with torch.set_grad_enabled(grad):
                return self.model(tokens, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()

    def capture(self, tokens):
        """Every block's input, every o_proj's input and every MLP write of one run."""
        got = {"resid": {}, "z": {}, "mlp": {}}

        def keep_input(store, i):
            def hook(module, args, kwargs):
                store[i] = (_hidden(args, kwargs) if store is got["resid"] else args[0]).detach().clone()
            return hook

        def keep_output(i):
            def hook(module, args, output):
                got["mlp"][i] = _first(output).detach().clone()
            return hook

        hooks = []
        for i in range(len(self.blocks)):
            hooks += [(self.blocks[i], "pre", keep_input(got["resid"], i)), (self.o_proj[i], "pre", keep_input(got["z"], i)),
                      (self.mlp[i], "post", keep_output(i))]
        self._run(tokens, hooks)
        return got

    def effects(self, pair: Pair) -> dict[str, torch.Tensor]:
        clean = self.capture(pair.clean)
        with torch.no_grad():
            base = pair.metric_rows(self._run(pair.corrupt, [])).mean()
        effect = lambda hooks: float(pair.metric_rows(self._run(pair.corrupt, hooks)).mean() - base)  # noqa: E731
        layers, seq = len(self.blocks), pair.clean.shape[1]

        def resid(i, p):
            def hook(module, args, kwargs):
                h = _hidden(args, kwargs).clone()
                h[:, p] = clean["resid"][i][:, p]
                return _with_hidden(args, kwargs, h)
            return hook

        def head(i, h):
            d_head = clean["z"][i].shape[-1] // self.n_heads

            def hook(module, args, kwargs):
                z = args[0].clone()
                z[..., h * d_head:(h + 1) * d_head] = clean["z"][i][..., h * d_head:(h + 1) * d_head]
                return (z, *args[1:]), kwargs
            return hook

        def mlp(i):
            def hook(module, args, output):
                return _replace_first(output, clean["mlp"][i])
            return hook

        out = {
            "resid_pre": torch.tensor([[effect([(self.blocks[i], "pre", resid(i, p))]) for p in range(seq)]
                                       for i in range(layers)]),
            "head_out": torch.tensor([[effect([(self.o_proj[i], "pre", head(i, h))]) for h in range(self.n_heads)]
                                      for i in range(layers)]),
            "mlp_out": torch.tensor([effect([(self.mlp[i], "post", mlp(i))]) for i in range(layers)]),
        }

        # AtP: the gradient of the summed metric with respect to every o_proj input of the corrupt run (each
        # kept in the graph, so a layer's gradient counts the paths through later layers); (clean - corrupt) . grad
        taps = {}

        def tap(i):
            def hook(module, args, kwargs):
                z = args[0] if args[0].requires_grad else args[0].clone().requires_grad_()
                taps[i] = z
                return (z, *args[1:]), kwargs
            return hook

        def leaf(module, args, kwargs):  # the first block's input in the graph whatever the parameters' requires_grad
            h = _hidden(args, kwargs)
            return None if h.requires_grad else _with_hidden(args, kwargs, h.clone().requires_grad_())

        hooks = [(self.blocks[0], "pre", leaf)] + [(self.o_proj[i], "pre", tap(i)) for i in range(layers)]
        logits = self._run(pair.corrupt, hooks, grad=True)
        grads = torch.autograd.grad(pair.metric_rows(logits).sum(), [taps[i] for i in range(layers)])
        rows = []
        for i in range(layers):
            product = (clean["z"][i] - taps[i].detach()) * grads[i]
            rows.append(product.reshape(*product.shape[:2], self.n_heads, -1).sum(dim=(1, 3)).mean(dim=0))
        out["atp"] = torch.stack(rows)
        return out


# --------------------------------------------------------------------------- one family
METHODS = ("resid_pre", "head_out", "mlp_out", "atp")


def max_diff(a: dict, b: dict) -> dict[str, float | None]:
    """max |a - b| per method; None where crosspatch (``a``) did not serve the sites."""
    return {k: None if isinstance(a[k], str) else
            float((torch.as_tensor(a[k], dtype=torch.float64) - torch.as_tensor(b[k], dtype=torch.float64)).abs().max())
            for k in METHODS}


def worst(diffs: dict) -> float | None:
    return max((v for v in diffs.values() if v is not None), default=None)


def check(family: Family, pair: Pair, seed: int) -> dict:
    row = {"family": family.model_type, "label": family.label or family.model_type, "role": family.role,
           "notes": [family.note] if family.note else []}
    model = build(family, seed)
    config = model.config
    layers = config.num_hidden_layers
    n_heads = config.num_attention_heads
    ours = crosspatch_effects(model, pair, layers)
    row["max_effect"] = {k: None if isinstance(v, str) else float(v.abs().max()) for k, v in ours.items()}
    row["notes"] += sorted({f"crosspatch: {v}" for v in ours.values() if isinstance(v, str)})
    pattern = pattern_capture_drift(model, pair)
    if pattern is not None and pattern > 1e-5:  # sdpa against an eager softmax alone moves them ~1e-6
        row["notes"].append(f"crosspatch: a run capturing `attn_pattern.*` (its own eager attention function) gives "
                            f"logits {fmt(pattern)} away from HF's forward")

    row["tl"] = "no conversion" if family.tl is None else None
    if family.tl is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tl = hooked_transformer(family, model, row["notes"])
            row["logits"] = float((tl(pair.clean).detach() - hf_logits(model, pair.clean)).abs().max())
            row["tl"] = "loads"
        except Exception as exc:  # noqa: BLE001 (what failed is the finding)
            row["tl"] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            if os.environ.get("TL_AGREEMENT_DEBUG"):
                traceback.print_exc()
    if row["tl"] == "loads" and row["logits"] <= TOL:
        row["reference"] = "TransformerLens"
        row["diff"] = max_diff(ours, tl_effects(tl, pair))
    hands = Hooks(family, model, n_heads).effects(pair)
    row["hand"] = max_diff(ours, hands)
    if "diff" not in row:
        row["reference"] = "hand-written hooks"
        row["diff"] = row["hand"]
    row["ok"] = all(v is not None and v <= TOL for v in (*row["diff"].values(), *row["hand"].values()))
    if not row["ok"] and family.if_fails:
        row["notes"].append(family.if_fails)
    return row


# --------------------------------------------------------------------------- report
def fmt(x: float | None, missing: str = "not served") -> str:
    return missing if x is None else f"{x:.1e}"


def table(rows: list[dict]) -> str:
    lines = [
        "| family | TL loads? | logits diff | resid_pre | head_out | mlp_out | AtP | hand hooks (max) | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loads = "yes" if r["tl"] == "loads" else ("no (no conversion)" if r["tl"] == "no conversion" else "no (fails)")
        logits = fmt(r["logits"]) if "logits" in r else "-"
        cells = [fmt(r["diff"][k]) for k in METHODS]
        if r["ok"]:
            verdict = "agrees with TransformerLens" if r["reference"] == "TransformerLens" else "checked against hand-written hooks"
        elif any(v is None for v in r["diff"].values()):
            verdict = "**crosspatch does not serve the sites** (see notes)"
        else:
            verdict = f"**DISAGREES** with {r['reference']}"
        lines.append(f"| {r['label']} | {loads} | {logits} | {' | '.join(cells)} | {fmt(worst(r['hand']), '-')} | {verdict} |")
    return "\n".join(lines)


def versions() -> str:
    import transformer_lens  # noqa: F401
    import transformers
    from importlib.metadata import version

    return (f"torch {torch.__version__}, transformers {transformers.__version__}, transformer_lens "
            f"{version('transformer_lens')}, Python {platform.python_version()}, {platform.machine()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated model types")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(HERE, "tl_agreement.md"), help="'' writes no file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    wanted = {t for t in args.only.split(",") if t}
    families = [f for f in FAMILIES if not wanted or f.model_type in wanted]
    pair = make_pair(args.batch, args.seq, args.seed + 1)

    rows, start = [], time.time()
    for family in families:
        t0 = time.time()
        row = check(family, pair, args.seed)
        rows.append(row)
        print(f"{row['label']:12s} TL: {row['tl'][:70]:70s} reference: {row['reference']:18s} "
              f"max|diff| {fmt(worst(row['diff']))} hand {fmt(worst(row['hand']))} "
              f"max|effect| {fmt(worst(row['max_effect']))} ({time.time() - t0:.1f} s)", flush=True)

    md = [
        "# crosspatch vs TransformerLens on identical weights",
        "",
        f"`benchmarks/tl_agreement.py` ({datetime.date.today().isoformat()}; {versions()}). "
        f"Tiny random models (`tiny_model(type, initializer_range=0.1)`, 2 layers, d_model 64, 4 heads), "
        f"{args.batch} prompts of {args.seq} tokens, the corrupt prompt differing in token {args.seq // 2}; "
        "denoising logit difference at the last position. Cells are max |crosspatch - reference| over every "
        f"site; tolerance {TOL:g}. Reference: TransformerLens when it loads the weights and its logits equal "
        "HF's within the tolerance, else hand-written torch hooks on the HF modules. *hand hooks* is the max "
        "difference from the hand-written hooks over the four methods, for every family.",
        "",
        table(rows),
        "",
        "Largest effects (max |crosspatch effect| over the sites, per method):",
        "",
        "| family | resid_pre | head_out | mlp_out | AtP |",
        "|---|---|---|---|---|",
    ]
    md += [f"| {r['label']} | " + " | ".join(fmt(r["max_effect"][k]) for k in METHODS) + " |" for r in rows]
    notes = [r for r in rows if r["notes"] or r["tl"] not in ("loads", "no conversion")
             or (r["tl"] == "loads" and r["logits"] > TOL)]
    if notes:
        md += ["", "Notes:", ""]
        for r in notes:
            bits = list(r["notes"])
            if r["tl"] not in ("loads", "no conversion"):
                bits.append(f"TransformerLens {r['tl']}")
            elif r["tl"] == "loads" and r["logits"] > TOL:
                bits.append(f"TransformerLens's logits differ from HF's by {fmt(r['logits'])}")
            md.append(f"- {r['label']}: " + "; ".join(bits))
    text = "\n".join(md) + "\n"
    print()
    print(text)
    if args.out and not wanted:
        with open(args.out, "w") as f:
            f.write(text)
    print(f"{len(rows)} families in {time.time() - start:.0f} s")
    bad = [r["label"] for r in rows if not r["ok"]]
    if bad:
        print(f"crosspatch disagrees beyond {TOL:g}: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
