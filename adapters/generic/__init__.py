"""Any ``nn.Module``: ``module.<path>`` (a module's output), ``module_in.<path>`` (its first input), fields of
tuple and dict outputs (``module_out<i>.<path>``, ``module_out_<key>.<path>``), numbered children of a stack as
layers (``module.<stack>.<i>``, the stack's own output ``stack.<path>``). See docs/generic.md.
"""

from .adapter import GenericAdapter
from .catalog import GenericCatalog
from .errors import SharedModuleError

__all__ = ["GenericAdapter", "GenericCatalog", "SharedModuleError"]
