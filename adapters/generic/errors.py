"""The generic adapter's own error."""

from __future__ import annotations

from crosspatch.sites.site import SiteError

__all__ = ["SharedModuleError"]


class SharedModuleError(SiteError):
    """A module runs more than once in one forward (shared or reused), so one site cannot name its activation."""
