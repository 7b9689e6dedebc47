"""Attribution graphs: transcoders' local replacement model of one prompt and its graph of direct effects.

``graph`` builds :class:`AttributionGraph` (:func:`attribution_graph`); ``replacement`` holds the clean
run and the frozen forwards; ``freeze`` what is frozen (attention patterns, norm scales); ``targets``
what is attributed; ``prune`` influence, pruning and the replacement / completeness scores;
``interventions`` feature edits in the real model; ``qk`` QK attribution (one attention score split over
the graph's nodes at the query and key positions); ``export`` Neuronpedia's graph JSON; ``zoo`` the
zoo's transcoder entries. See docs/attribution_graphs.md.
"""

from .export import save_neuronpedia, to_neuronpedia
from .graph import AttributionGraph, attribution_graph
from .interventions import FeatureEdit, feature_intervention, generate
from .prune import Pruned, influence, prune, scores
from .qk import QKAttribution, qk_attribution
from .targets import Target, direction_target, logit_diff, logit_target

__all__ = [
    "AttributionGraph", "attribution_graph", "Target", "direction_target", "logit_diff", "logit_target",
    "Pruned", "prune", "influence", "scores", "FeatureEdit", "feature_intervention", "generate",
    "to_neuronpedia", "save_neuronpedia", "QKAttribution", "qk_attribution",
]
