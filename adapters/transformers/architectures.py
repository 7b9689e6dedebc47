"""Where each supported transformers family keeps the modules behind every site.

Paths are relative to one block (``layers`` is relative to the base model). Adding a family
that follows one of these layouts is one entry in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    layers: str  # the block list, from the base model
    embed: str | None  # module (from the base model) whose output is the embedding written into the residual;
    # None: the model computes it outside any module, and the first block's input is the embedding
    attn: str  # module whose output (element 0) is the attention's write into the residual
    attn_core: str  # module handed to the attention function (owner of the pattern)
    o_proj: str  # attention output projection; its input holds the heads side by side
    mlp: str  # module whose output is the MLP's write into the residual
    mlp_down: str | None  # MLP output projection; its input is the neuron activations (None: no mlp_act)
    resid_mid: str | None  # "sum": block input + attention output; a module path; None: no such point
    conv1d: bool = False  # GPT-2's Conv1D stores weights as [in, out]
    causal: bool = True  # each position attends only to itself and earlier positions
    # The argument (by name) through which ``attn`` / ``mlp`` is handed the residual it adds to its own
    # output (BLOOM); None: the module's output is the write itself.
    attn_residual: str | None = None
    mlp_residual: str | None = None
    pattern_input: str | None = None  # a module whose input is the pattern, where the attention computes it inline
    # Post-norm blocks inferred as such (resid_mid then the norm of input + attention): the norm of
    # resid_mid + mlp_out that gives the block output, which the proof checks.
    resid_norm: str | None = None
    # A layer scale the block multiplies a branch's output by inline (BEiT's lambda_1 / lambda_2): the block's
    # parameter; the write is then the module's output times it.
    attn_scale: str | None = None
    mlp_scale: str | None = None
    # Modules (relative to the block) that see the block's tokens flattened to [batch * pos, ...] (OPT's MLP
    # and the norm before it): their sites are read and written unflattened.
    flat: tuple[str, ...] = ()
    # Branch modules (relative to the block) whose output the block changes in place after they return (Falcon
    # adds the attention's write to the MLP's output): their write sites hand the block a copy.
    copied: tuple[str, ...] = ()

    @property
    def residual_sum(self) -> bool:
        """Whether ``resid_post = resid_pre + attn_out + mlp_out`` (every layout but post-LN)."""
        return self.resid_mid in ("sum", None) or self.attn_residual is not None


_LLAMA = Architecture(
    layers="layers",
    embed="embed_tokens",
    attn="self_attn",
    attn_core="self_attn",
    o_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_down="mlp.down_proj",
    resid_mid="sum",
)

_BERT = Architecture(
    layers="encoder.layer",
    embed="embeddings",
    attn="attention.output.dense",
    attn_core="attention.self",
    o_proj="attention.output.dense",
    mlp="output.dense",
    mlp_down="output.dense",
    resid_mid="attention",
    causal=False,
)

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(
        layers="h",
        embed="drop",
        attn="attn",
        attn_core="attn",
        o_proj="attn.c_proj",
        mlp="mlp",
        mlp_down="mlp.c_proj",
        resid_mid="sum",
        conv1d=True,
    ),
    "gpt_neox": Architecture(
        layers="layers",
        embed="emb_dropout",
        attn="attention",
        attn_core="attention",
        o_proj="attention.dense",
        mlp="mlp",
        mlp_down="mlp.dense_4h_to_h",
        resid_mid="sum",  # None when use_parallel_residual (see architecture_for)
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "bert": _BERT,
    "roberta": _BERT,
}


def architecture_for(config) -> Architecture | None:
    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is not None and config.model_type == "gpt_neox" and getattr(config, "use_parallel_residual", True):
        # x + attn(ln1(x)) + mlp(ln2(x)): no residual point between attention and MLP.
        arch = Architecture(**{**arch.__dict__, "resid_mid": None})
    return arch
