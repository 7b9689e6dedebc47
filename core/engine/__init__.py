"""The engine: one forward with captures and interventions, for any adapter.

``adapter`` is the contract an architecture plugin fulfils; ``reach`` the architecture-free reaches
(a module's output or input) and per-slot gradient sinks; ``interventions`` the objects that edit an
activation; ``cache`` captured activations; ``resume`` and ``output_positions`` what a run may skip;
``offload`` models dispatched by accelerate; ``forward`` runs one forward (:func:`execute`); ``model``
is :class:`WrappedModel` and :func:`wrap`. It imports the site vocabulary and the plugin registry
(through which :func:`wrap` finds adapters), nothing above.
"""

from .forward import Bound, Run, execute

__all__ = ["Bound", "Run", "execute"]
