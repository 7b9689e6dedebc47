"""Independent GPT-2 forward pass, used as a test oracle.

Computes every internal activation of a HuggingFace ``GPT2LMHeadModel``
directly from its parameters, using only tensor ops and
``torch.nn.functional``; no submodule's ``forward`` is ever called.
Assumes eval mode (no dropout) and no attention mask (all tokens real).

This is a plain module with no package-relative imports, so it can be
imported either as ``reference_gpt2`` (directory on ``sys.path``) or
relatively from a sibling test module.
"""
import math

import torch
import torch.nn.functional as F


def _layer_norm(x, ln, eps):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps) * ln.weight + ln.bias


def _gelu_new(x):
    # The tanh approximation used by the original GPT-2 ("gelu_new").
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


_ACTIVATIONS = {
    "gelu_new": _gelu_new,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


@torch.no_grad()
def gpt2_reference(model, input_ids: torch.LongTensor) -> dict[str, torch.Tensor]:
    """Return every activation of ``model`` on ``input_ids``, keyed by name.

    Layouts: "embed" [B,T,D]; per layer l: "resid_pre.l", "attn_out.l",
    "resid_mid.l", "mlp_out.l", "resid_post.l" [B,T,D]; "attn_pattern.l"
    [B,H,Tq,Tk]; "head_z.l" [B,T,H,Dh]; "head_out.l" [B,T,H,D] (no output bias); "mlp_act.l"
    [B,T,M]; "logits" [B,T,V].
    """
    cfg = model.config
    tr = model.transformer
    eps = cfg.layer_norm_epsilon
    act = _ACTIVATIONS[cfg.activation_function]
    B, T = input_ids.shape
    H = cfg.n_head
    D = cfg.n_embd
    Dh = D // H
    pos = torch.arange(T, device=input_ids.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()

    out = {}
    x = tr.wte.weight[input_ids] + tr.wpe.weight[pos]
    out["embed"] = x
    for l, block in enumerate(tr.h):
        out[f"resid_pre.{l}"] = x
        attn = block.attn

        # Attention. Conv1D: y = x @ W + b, W has shape [in, out].
        h = _layer_norm(x, block.ln_1, eps)
        qkv = h @ attn.c_attn.weight + attn.c_attn.bias  # [B,T,3D]
        q, k, v = (t.view(B, T, H, Dh).transpose(1, 2) for t in qkv.split(D, dim=-1))  # [B,H,T,Dh]
        scale = Dh**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(l + 1)
        scores = (q @ k.transpose(-1, -2)) * scale  # [B,H,Tq,Tk]
        scores = scores.masked_fill(~causal, float("-inf"))
        pattern = scores.softmax(dim=-1)
        out[f"attn_pattern.{l}"] = pattern
        z = (pattern @ v).transpose(1, 2)  # [B,T,H,Dh]
        out[f"head_z.{l}"] = z
        W_O = attn.c_proj.weight.view(H, Dh, D)  # rows of head h: W_O[h*Dh:(h+1)*Dh]
        head_out = torch.einsum("bthe,hed->bthd", z, W_O)  # [B,T,H,D]
        out[f"head_out.{l}"] = head_out
        attn_out = head_out.sum(2) + attn.c_proj.bias
        out[f"attn_out.{l}"] = attn_out
        x = x + attn_out
        out[f"resid_mid.{l}"] = x

        # MLP.
        h = _layer_norm(x, block.ln_2, eps)
        mlp_act = act(h @ block.mlp.c_fc.weight + block.mlp.c_fc.bias)
        out[f"mlp_act.{l}"] = mlp_act
        mlp_out = mlp_act @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
        out[f"mlp_out.{l}"] = mlp_out
        x = x + mlp_out
        out[f"resid_post.{l}"] = x

    # Final layer norm, then the (tied) unembedding.
    out["logits"] = _layer_norm(x, tr.ln_f, eps) @ model.lm_head.weight.T
    return out
