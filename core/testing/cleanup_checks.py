"""The checks of what runs leave behind: every module's hooks as they were (yours included, and also after
a forward that raises, whose error must reach the caller), and the model's parameters, buffers, mode and
plain output unchanged after the whole suite.

The hooks check also reports every leak :meth:`SuiteBase._execute` found during the earlier checks, so
it runs after them; the state check runs last.
"""

from __future__ import annotations

import logging

from ..engine.forward import Bound
from ..engine.interventions import Patch
from ..sites.site import Site, site_key
from .probes import Raise, RaisedOnPurpose
from .runner import SuiteBase, family_keys, family_layers
from .tensors import exact, max_diff, model_state

log = logging.getLogger(__name__)


class CleanupChecks(SuiteBase):
    """The checks hooks and state."""

    def check_hooks(self) -> list[str]:
        problems: list[str] = []
        keys = [k for fam in self.families for k in family_keys(fam)]
        writable = [f for f in self.families if f.writable]
        # 1. The user's own hooks survive a run that reads and writes every site.
        sentinels = []
        try:
            for module in self.model.modules():
                sentinels.append(module.register_forward_hook(lambda *a: None))
                sentinels.append(module.register_forward_pre_hook(lambda *a: None))
            if self.cache is not None and writable:
                bounds = [Bound(Site(f.name, layer), Patch(self.cache)) for f in writable for layer in family_layers(f)
                          if site_key(f.name, layer) in self.cache]
                try:
                    self._execute("a run reading and writing every site, with hooks of your own present",
                                  self.prepared, bounds, capture=keys)
                except Exception:  # why it raised is the business of the other checks; hooks are compared anyway
                    log.debug("conformance: the run with hooks of your own raised", exc_info=True)
        finally:
            for h in sentinels:
                h.remove()
        # 2. A forward that raises midway.
        if writable:
            fam = writable[-1]
            bounds = [Bound(Site(fam.name, family_layers(fam)[-1]), Raise())]
            label = f"a run that raised inside an intervention at {bounds[0].site}"
            extra = None
        else:
            bounds = []
            label = "a run whose forward raised"

            def boom(module, args):
                raise RaisedOnPurpose("raised on purpose by crosspatch.testing before the forward")

            extra = self.model.register_forward_pre_hook(boom)
        try:
            self._execute(label, self.prepared, bounds, capture=keys)
        except Exception:  # the error itself (ours, or an earlier one another check reports) is expected
            log.debug("conformance: %s", label, exc_info=True)
        else:
            problems.append(f"{label}: the error raised in the forward was swallowed; it must reach the caller")
        finally:
            if extra is not None:
                extra.remove()
        leaks = [
            f"{problem} after {labels[0]}" + (f" (and {len(labels) - 1} other run(s))" if len(labels) > 1 else "")
            for problem, labels in self.hook_problems.items()
        ]
        return leaks + problems

    def check_state(self) -> list[str]:
        problems = []
        if self.model.training != self.training0:
            problems.append(f"the model's training flag changed to {self.model.training}")
        now = model_state(self.model)
        for name, before in self.state0.items():
            after = now.get(name)
            if after is None:
                problems.append(f"{name}: parameter or buffer disappeared")
            elif not exact(after, before):
                problems.append(f"{name}: parameter or buffer changed ({max_diff(after, before)})")
        added = sorted(set(now) - set(self.state0))
        if added:
            problems.append(f"parameters or buffers added to the model: {', '.join(added)}")
        out = self._execute("a plain forward at the end", self.prepared).output
        if not exact(out, self.plain):
            problems.append(
                f"a plain forward after the suite differs from one before it ({max_diff(out, self.plain)}); "
                f"a run left state behind (a switched implementation, a changed attribute)"
            )
        return problems
