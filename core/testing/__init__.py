"""The conformance suite for adapters: run it against your adapter before you publish a plugin.

    from crosspatch.testing import check_adapter, assert_conforms, AdapterConformance

Built on the engine only; nothing in crosspatch imports it.
"""

from .conformance import *  # noqa: F401,F403
from .conformance import __all__  # noqa: F401
