"""The edge patcher under a public name, for methods built on exact edge patching outside this package
(:mod:`crosspatch.methods.head_roles`).

:class:`EdgePatcher` is the patcher of :mod:`.patching`: it holds the clean inputs, the ablated sender values
(``resample``, ``zero`` or ``mean``: :data:`Ablation`) and the :class:`~.graph.EdgeGraph`, keeps the clean
run's prefix (``keep_clean``) and runs any stack of edge masks as row blocks of one forward (``run``).
"""

from .patching import Ablation
from .patching import _Patcher as EdgePatcher

__all__ = ["Ablation", "EdgePatcher"]
