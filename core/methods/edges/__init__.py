"""Edge graphs of residual models: exact edge patching in one forward, EAP, EAP-IG and ACDC.

Senders write into the residual stream: ``embed``, ``head_out.l[head=h]``, ``mlp_out.l``.
Receivers read it: ``head_in.l[qkv=r,head=h]`` (query, key and value separately; under grouped-query
attention one key and one value receiver per key/value head, ``head_in.l[qkv=r,head=a:b]`` over the slots of
the query heads it serves), ``mlp_in.l``, ``logits_in``. There is an edge from every sender to every receiver after it (a pre-LN block with
attention before the MLP: ``head_out.l`` feeds ``mlp_in.l`` and everything in later layers).
Only the catalog is used, so any adapter with these six families gets the methods.

**Convention** (``activation_patching(direction="noising")``): the base run is *clean*; a patched
(``mask = 1``) edge ``s -> r`` carries the *ablated* value of ``s`` (the corrupt run's for
``ablation="resample"``, zero, or the reference mean) instead of ``s``'s value in this run::

    input_r = input_r(this run) + sum_s mask[s -> r] * (ablated_s - s(this run))

So all edges patched gives the corrupt run (resample), no edges the clean run, and an unpatched
edge carries the sender's value in *this* run, which already holds the effect of patched edges
upstream (path semantics, as auto-circuit and ACDC). All mask variants of a call run as row blocks
of one forward.

The modules, each importing only those before it: ``graph`` (:class:`EdgeGraph`, :func:`edge_graph`,
a key's role and block), ``patching`` (the sender and receiver interventions, the patcher, the clean
prefix, :func:`patch_edges`), ``result`` (edge order of per-receiver-key scores, the Result),
``gradient_scores`` (:func:`eap`, :func:`eap_ig`) and ``acdc_search`` (:func:`acdc`, :func:`acdc_sweep`).
"""

from .acdc_search import acdc, acdc_sweep
from .gradient_scores import _gradient_run, eap, eap_ig
from .graph import EdgeGraph, edge_graph
from .patching import EdgePatcher, patch_edges

__all__ = ["EdgeGraph", "EdgePatcher", "edge_graph", "patch_edges", "eap", "eap_ig", "acdc", "acdc_sweep"]
