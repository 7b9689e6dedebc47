"""The site vocabulary: names for addressable activations and what one model has of them.

``site`` holds the :class:`Site` grammar (``head_out.5[head=2]``), ``catalog`` the families one wrapped
model offers with their axes and reaches (and the :class:`Reach` protocol an adapter implements),
``selection`` the index a site's axis selections make. The bottom of crosspatch: it imports nothing
else of it. ``crosspatch.sites`` gives the grammar's names, as before the package existed.
"""

from .site import ANY, LAST, Selector, Site, SiteError, Span, site_key, site_sequence, split_tower

__all__ = ["ANY", "LAST", "Span", "Selector", "Site", "SiteError", "site_key", "site_sequence", "split_tower"]
