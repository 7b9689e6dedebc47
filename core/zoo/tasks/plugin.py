"""Entry point of the built-in tasks (group ``crosspatch``, name ``tasks``)."""

from ...plugins.hookspecs import hookimpl

from .greater_than import GreaterThanTask
from .ioi import IOITask
from .shapes import ShapesTask


@hookimpl
def register_tasks(register):
    register(IOITask())
    register(GreaterThanTask())
    register(ShapesTask())
