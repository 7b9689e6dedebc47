"""The same patching experiments written once per library: crosspatch, TransformerLens, pyvene, nnsight.

Every library gets the *same* random-init GPT-2 weights: crosspatch, pyvene and nnsight wrap one
HF ``GPT2LMHeadModel``; TransformerLens builds a ``HookedTransformer`` from a
``HookedTransformerConfig`` and TransformerLens's own ``convert_gpt2_weights`` (no hub access; the
weights are loaded without folding or centering so the numerics match HF's).

Each ``Lib`` exposes the same five operations, all returning a metric per site (averaged over
prompts, minus the unpatched corrupt baseline, *denoising*: corrupt run, clean activation patched in):

* ``capture(tokens)``: one forward capturing every residual site (``resid_pre`` and ``resid_post``
  of every layer);
* ``bare(tokens)``: the library's forward without hooks;
* ``resid_pre_sweep()``: ``[layers, pos]`` effects, one site per forward (crosspatch batches sites);
* ``head_out_sweep()``: ``[layers, heads]`` effects, each head patched at every position;
* ``atp_heads()``: attribution patching of every head (``[layers, heads]``).

Peers are written the way their docs show: TransformerLens through ``transformer_lens.patching``
(``get_act_patch_resid_pre``, ``get_act_patch_attn_head_out_all_pos``) and a hook-based AtP as in
its attribution-patching demo; pyvene with one ``IntervenableModel`` per layer and one
interchange call per site (``VanillaIntervention``, units ``pos`` / ``h``); nnsight with one
``model.trace`` per site, assigning the clean activation saved in a first trace.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's patching loop draws a progress bar

from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 1000


@dataclass
class Setup:
    layers: int
    seq: int
    batch: int
    d_model: int = 256
    heads: int = 8
    pair: str = "middle"  # the corrupt prompt differs in the middle token, or at position 1 ("first")

    @property
    def differs_at(self) -> int:
        return self.seq // 2 if self.pair == "middle" else 1

    @property
    def label(self) -> str:
        width = "" if self.d_model == 256 else f" d{self.d_model}"
        return f"{self.layers}L{width} seq {self.seq} batch {self.batch}, {self.pair} pair"

    def build(self, seed: int = 0):
        torch.manual_seed(seed)
        # initializer_range 0.1 (GPT-2 uses 0.02) so that random-init effects are far above float error
        config = GPT2Config(
            n_layer=self.layers, n_head=self.heads, n_embd=self.d_model, vocab_size=VOCAB, n_positions=max(128, self.seq),
            initializer_range=0.1,
        )
        model = GPT2LMHeadModel(config).eval()
        gen = torch.Generator().manual_seed(seed + 1)
        clean = torch.randint(0, VOCAB, (self.batch, self.seq), generator=gen)
        corrupt = clean.clone()
        corrupt[:, self.differs_at] = (corrupt[:, self.differs_at] + 1) % VOCAB
        answer = clean[:, -1]
        distractor = (answer + 1) % VOCAB
        return model, clean, corrupt, answer, distractor


def logit_diff_rows(logits: torch.Tensor, answer: torch.Tensor, distractor: torch.Tensor) -> torch.Tensor:
    last = logits[:, -1]
    rows = torch.arange(last.shape[0], device=last.device)
    return last[rows, answer] - last[rows, distractor]


# --------------------------------------------------------------------------- crosspatch
class Crosspatch:
    name = "crosspatch"

    def __init__(self, model, clean, corrupt, answer, distractor):
        import crosspatch as cp

        self.cp, self.model = cp, model
        self.m = cp.wrap(model)
        self.clean, self.corrupt = clean, corrupt
        self.metric = cp.metrics.logit_diff(answer, distractor)
        self.layers = model.config.n_layer

    def bare(self, tokens):
        with torch.inference_mode():
            return self.model(tokens, use_cache=False).logits

    def capture(self, tokens):
        return self.m.run(tokens, capture=["resid_pre.*", "resid_post.*"]).cache

    def resid_pre_sweep(self, **options):
        r = self.cp.activation_patching(
            self.m, self.clean, self.corrupt, "resid_pre.*[pos=*]", self.metric, progress=False, **options
        )
        return torch.as_tensor(r.values).reshape(self.layers, -1)

    def resid_pre_sites(self, sites):
        """Effects of ``resid_pre`` at the given ``(layer, pos)`` pairs (one list of sites, one sweep)."""
        names = [f"resid_pre.{layer}[pos={pos}]" for layer, pos in sites]
        return self.resid_pre_result(names).values

    def resid_pre_result(self, names):
        return self.cp.activation_patching(self.m, self.clean, self.corrupt, names, self.metric, progress=False)

    # The same sweep with crosspatch's savings switched off one by one (timed, not compared).
    def resid_pre_sweep_every_site(self):
        """Also the sites whose clean and corrupt values are equal (skipped by default: their effect is 0)."""
        return self.resid_pre_sweep(skip_unchanged=False)

    def resid_pre_sweep_recompute(self):
        """Every site, and the whole model per site (no prefix reuse)."""
        return self.resid_pre_sweep(skip_unchanged=False, reuse_prefix=False)

    def head_out_sweep(self):
        r = self.cp.activation_patching(self.m, self.clean, self.corrupt, "head_out.*[head=*]", self.metric, progress=False)
        return torch.as_tensor(r.values).reshape(self.layers, -1)

    def atp_heads(self):
        from crosspatch.methods.attribution import attribution_patching

        r = attribution_patching(self.m, self.clean, self.corrupt, "head_out.*[head=*]", self.metric)
        return torch.as_tensor(r.values).reshape(self.layers, -1)

    def atp_heads_unshared(self):
        """AtP of a pair that differs at the first position too, so the source run shares no positions (timed)."""
        from crosspatch.methods.attribution import attribution_patching

        corrupt = self.corrupt.clone()
        corrupt[:, 0] = (corrupt[:, 0] + 1) % VOCAB
        r = attribution_patching(self.m, self.clean, corrupt, "head_out.*[head=*]", self.metric)
        return torch.as_tensor(r.values).reshape(self.layers, -1)


# --------------------------------------------------------------------------- TransformerLens
def hooked_transformer(hf_model):
    """A HookedTransformer with ``hf_model``'s weights, converted by TransformerLens's own function."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd,
        d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new", normalization_type="LN",
        eps=c.layer_norm_epsilon, positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, device=str(next(hf_model.parameters()).device),
    )
    tl = HookedTransformer(cfg)
    state = convert_gpt2_weights(hf_model, cfg)
    tl.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return tl.eval()


class TransformerLens:
    name = "TransformerLens"

    def __init__(self, model, clean, corrupt, answer, distractor):
        from transformer_lens import patching

        self.patching = patching
        patching.tqdm = lambda iterable, **kwargs: iterable  # no progress bar inside timed loops
        self.tl = hooked_transformer(model)
        self.clean, self.corrupt, self.answer, self.distractor = clean, corrupt, answer, distractor
        with torch.inference_mode():
            self.corrupt_metric = logit_diff_rows(self.tl(corrupt), answer, distractor).mean()

    def _metric(self, logits):
        return logit_diff_rows(logits, self.answer, self.distractor).mean() - self.corrupt_metric

    def bare(self, tokens):
        with torch.inference_mode():
            return self.tl(tokens)

    def capture(self, tokens):
        with torch.inference_mode():
            _, cache = self.tl.run_with_cache(
                tokens, names_filter=lambda n: n.endswith("hook_resid_pre") or n.endswith("hook_resid_post")
            )
        return cache

    def resid_pre_sweep(self):
        with torch.inference_mode():
            _, cache = self.tl.run_with_cache(self.clean)
            return self.patching.get_act_patch_resid_pre(self.tl, self.corrupt, cache, self._metric)

    def resid_pre_sites(self, sites):
        """``get_act_patch_resid_pre``'s own loop (``generic_activation_patch``) over the given sites only."""
        import pandas as pd

        index = pd.DataFrame(list(sites), columns=["layer", "pos"])
        with torch.inference_mode():
            _, cache = self.tl.run_with_cache(self.clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
            return self.patching.generic_activation_patch(
                self.tl, self.corrupt, cache, self._metric, self.patching.layer_pos_patch_setter, "resid_pre",
                index_df=index,
            )

    def head_out_sweep(self):
        with torch.inference_mode():
            _, cache = self.tl.run_with_cache(self.clean)
            return self.patching.get_act_patch_attn_head_out_all_pos(self.tl, self.corrupt, cache, self._metric)

    def atp_heads(self):
        """Hook-based AtP as in TransformerLens's attribution-patching demo: cache ``hook_z`` of the
        clean run, cache ``hook_z`` and its gradient on the corrupt run, one backward."""
        tl = self.tl
        is_z = lambda name: name.endswith("attn.hook_z")  # noqa: E731
        with torch.no_grad():
            _, clean_cache = tl.run_with_cache(self.clean, names_filter=is_z)
        acts, grads = {}, {}

        def fwd(act, hook):
            acts[hook.name] = act.detach()

        def bwd(grad, hook):
            grads[hook.name] = grad.detach()

        tl.reset_hooks()
        tl.add_hook(is_z, fwd, "fwd")
        tl.add_hook(is_z, bwd, "bwd")
        try:
            logits = tl(self.corrupt)
            # summed over prompts: per-prompt gradients, averaged after the product (crosspatch's convention)
            logit_diff_rows(logits, self.answer, self.distractor).sum().backward()
        finally:
            tl.reset_hooks()
        tl.zero_grad(set_to_none=True)
        out = []
        for layer in range(tl.cfg.n_layers):
            name = f"blocks.{layer}.attn.hook_z"
            diff = clean_cache[name] - acts[name]  # [batch, pos, head, d_head]
            out.append((diff * grads[name]).sum(dim=(1, 3)).mean(dim=0))
        return torch.stack(out)


# --------------------------------------------------------------------------- pyvene
class Pyvene:
    name = "pyvene"

    def __init__(self, model, clean, corrupt, answer, distractor):
        import pyvene as pv

        self.pv, self.model = pv, model
        self.clean, self.corrupt, self.answer, self.distractor = clean, corrupt, answer, distractor
        self.layers, self.heads = model.config.n_layer, model.config.n_head
        with torch.inference_mode():
            self.corrupt_metric = logit_diff_rows(model(corrupt, use_cache=False).logits, answer, distractor).mean()
        self._pos = [self._intervenable(layer, "block_input", "pos") for layer in range(self.layers)]
        self._head = [self._intervenable(layer, "head_attention_value_output", "h") for layer in range(self.layers)]

    def _intervenable(self, layer, component, unit):
        pv = self.pv
        config = pv.IntervenableConfig(
            representations=[
                pv.RepresentationConfig(layer, component, unit, 1, intervention_type=pv.VanillaIntervention)
            ]
        )
        im = pv.IntervenableModel(config, self.model)
        im.disable_model_gradients()
        return im

    def bare(self, tokens):
        with torch.inference_mode():
            return self.model(tokens, use_cache=False).logits

    def capture(self, tokens):
        raise NotImplementedError("not measured for pyvene")

    def _loop(self, intervenables, n_units):
        b = self.clean.shape[0]
        out = torch.zeros(self.layers, n_units)
        with torch.inference_mode():
            for layer, im in enumerate(intervenables):
                for u in range(n_units):
                    loc = [[[u]] * b]
                    _, patched = im(
                        {"input_ids": self.corrupt},
                        [{"input_ids": self.clean}],
                        unit_locations={"sources->base": (loc, loc)},
                    )
                    out[layer, u] = logit_diff_rows(patched.logits, self.answer, self.distractor).mean() - self.corrupt_metric
        return out

    def resid_pre_sweep(self):
        return self._loop(self._pos, self.clean.shape[1])

    def head_out_sweep(self):
        return self._loop(self._head, self.heads)

    def resid_pre_sites(self, sites):
        """The uncached loop over the given ``(layer, pos)`` sites only."""
        b = self.clean.shape[0]
        out = torch.zeros(len(sites))
        with torch.inference_mode():
            for i, (layer, pos) in enumerate(sites):
                loc = [[[pos]] * b]
                _, patched = self._pos[layer](
                    {"input_ids": self.corrupt}, [{"input_ids": self.clean}], unit_locations={"sources->base": (loc, loc)}
                )
                out[i] = logit_diff_rows(patched.logits, self.answer, self.distractor).mean() - self.corrupt_metric
        return out

    def _clean_values(self, module_of):
        """The clean run's input to ``module_of(block)`` in every block, by plain forward pre-hooks."""
        saved = {}
        blocks = self.model.transformer.h
        hooks = [module_of(block).register_forward_pre_hook(lambda m, args, i=i: saved.__setitem__(i, args[0].detach()))
                 for i, block in enumerate(blocks)]
        try:
            with torch.inference_mode():
                self.model(self.clean, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        return [saved[i] for i in range(len(blocks))]

    def _cached_loop(self, intervenables, n_units, source_of, sites=None):
        """Source cached: one clean forward, then one ``source_representations`` call per site."""
        b = self.clean.shape[0]
        sites = sites if sites is not None else [(layer, u) for layer in range(self.layers) for u in range(n_units)]
        out = torch.zeros(len(sites))
        with torch.inference_mode():
            for i, (layer, u) in enumerate(sites):
                loc = [[[u]] * b]
                _, patched = intervenables[layer](
                    {"input_ids": self.corrupt}, unit_locations={"sources->base": (None, loc)},
                    source_representations=source_of(layer, u),
                )
                out[i] = logit_diff_rows(patched.logits, self.answer, self.distractor).mean() - self.corrupt_metric
        return out

    def resid_pre_sweep_cached(self, sites=None):
        clean = self._clean_values(lambda block: block)
        out = self._cached_loop(self._pos, self.clean.shape[1], lambda layer, pos: clean[layer][:, [pos]], sites)
        return out if sites is not None else out.view(self.layers, -1)

    def resid_pre_sites_cached(self, sites):
        return self.resid_pre_sweep_cached(sites)

    def head_out_sweep_cached(self):
        z = self._clean_values(lambda block: block.attn.c_proj)
        d_head = self.model.config.n_embd // self.heads
        b, seq = self.clean.shape

        def source(layer, h):
            return z[layer].view(b, seq, self.heads, d_head)[:, :, h].unsqueeze(1)

        return self._cached_loop(self._head, self.heads, source).view(self.layers, -1)


# --------------------------------------------------------------------------- nnsight
class NNsight:
    name = "nnsight"

    def __init__(self, model, clean, corrupt, answer, distractor):
        from nnsight import NNsight as Wrapper

        self.model = model
        self.nm = Wrapper(model)
        self.clean, self.corrupt, self.answer, self.distractor = clean, corrupt, answer, distractor
        self.layers, self.heads = model.config.n_layer, model.config.n_head
        with torch.inference_mode():
            self.corrupt_metric = logit_diff_rows(model(corrupt, use_cache=False).logits, answer, distractor).mean()

    def bare(self, tokens):
        with torch.inference_mode():
            return self.model(tokens, use_cache=False).logits

    def capture(self, tokens):
        nm = self.nm
        with torch.inference_mode():
            pre, post = [], []
            with nm.trace(tokens, use_cache=False):
                for i in range(self.layers):
                    pre.append(nm.transformer.h[i].input.save())
                    post.append(nm.transformer.h[i].output.save())
        return pre, post

    def resid_pre_sweep(self):
        nm, seq = self.nm, self.clean.shape[1]
        out = torch.zeros(self.layers, seq)
        with torch.inference_mode():
            clean_resid = []  # appended to inside the trace (its body runs in another frame)
            with nm.trace(self.clean, use_cache=False):
                for i in range(self.layers):
                    clean_resid.append(nm.transformer.h[i].input.save())
            for layer in range(self.layers):
                for p in range(seq):
                    with nm.trace(self.corrupt, use_cache=False):
                        nm.transformer.h[layer].input[:, p] = clean_resid[layer][:, p]
                        logits = nm.output.logits.save()
                    out[layer, p] = logit_diff_rows(logits, self.answer, self.distractor).mean() - self.corrupt_metric
        return out

    def resid_pre_sites(self, sites):
        nm = self.nm
        out = torch.zeros(len(sites))
        with torch.inference_mode():
            clean_resid = []
            with nm.trace(self.clean, use_cache=False):
                for i in range(self.layers):
                    clean_resid.append(nm.transformer.h[i].input.save())
            for j, (layer, p) in enumerate(sites):
                with nm.trace(self.corrupt, use_cache=False):
                    nm.transformer.h[layer].input[:, p] = clean_resid[layer][:, p]
                    logits = nm.output.logits.save()
                out[j] = logit_diff_rows(logits, self.answer, self.distractor).mean() - self.corrupt_metric
        return out

    def head_out_sweep(self):
        nm = self.nm
        d_head = self.model.config.n_embd // self.heads
        out = torch.zeros(self.layers, self.heads)
        with torch.inference_mode():
            clean_z = []
            with nm.trace(self.clean, use_cache=False):
                for i in range(self.layers):
                    clean_z.append(nm.transformer.h[i].attn.c_proj.input.save())
            for layer in range(self.layers):
                for h in range(self.heads):
                    sl = slice(h * d_head, (h + 1) * d_head)
                    with nm.trace(self.corrupt, use_cache=False):
                        nm.transformer.h[layer].attn.c_proj.input[:, :, sl] = clean_z[layer][:, :, sl]
                        logits = nm.output.logits.save()
                    out[layer, h] = logit_diff_rows(logits, self.answer, self.distractor).mean() - self.corrupt_metric
        return out


LIBS = [Crosspatch, TransformerLens, Pyvene, NNsight]
