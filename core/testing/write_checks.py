"""The checks of writing: a Patch with a site's own activation changes nothing, exactly, and a perturbed
write at every writable site reaches the output, only in the rows it was bound to.

A family can be left out of one of them with ``skip=["writes:<family>"]`` (a dead end such as a
posterior's log-variance when the mean is decoded).
"""

from __future__ import annotations

from ..engine.adapter import repeat_rows
from ..engine.forward import Bound
from ..engine.interventions import Patch
from ..sites.catalog import SiteFamily
from ..sites.site import Site, site_key
from .probes import Perturb
from .report import DEAD_END
from .runner import Skip, SuiteBase, family_layers, fmt_exc
from .tensors import close, exact, max_diff


class WriteChecks(SuiteBase):
    """The checks self_patch and writes."""

    def _writable(self, check: str) -> list[SiteFamily]:
        return [f for f in self.families if f.writable and not self._skipped(check, f.name)]

    def check_self_patch(self) -> list[str]:
        self._need_cache()
        families = self._writable("self_patch")
        if not families:
            raise Skip("no writable family was reached")
        keys = list(self.cache)
        if self.out_all is not None:
            source, base_out, base_cache = self.cache, self.out_all, self.cache
        else:
            base = self._execute("a run capturing the reachable sites", self.prepared, capture=keys)
            source, base_out, base_cache = base.cache, base.output, base.cache
        problems = []
        for fam in families:
            bounds = [Bound(Site(fam.name, layer), Patch(source)) for layer in family_layers(fam)]
            try:
                run = self._execute(f"a self-patch of {fam.name}", self.prepared, bounds, capture=keys)
            except Exception as err:
                problems.append(self.about(fam.name, f"{fam.name}: a Patch with the activation of the same inputs raised {fmt_exc(err)}"))
                continue
            if not exact(run.output, base_out):
                problems.append(self.about(fam.name,
                    f"{fam.name}: patching every layer with its own activation changed the output "
                    f"({max_diff(run.output, base_out)}); the write-back is not exact"
                ))
                continue
            for key in keys:
                if not exact(run.cache[key], base_cache[key]):
                    problems.append(self.about(fam.name,
                        f"{fam.name}: patching it with its own activation changed {key} "
                        f"({max_diff(run.cache[key], base_cache[key])})"
                    ))
                    break
        return problems

    def check_writes(self) -> list[str]:
        families = self._writable("writes")
        if not families:
            raise Skip("no writable family was reached")
        n, plain = self.n, self.plain
        batch_first = plain.ndim > 0 and plain.shape[0] == n
        problems = []
        for fam in families:
            layers = family_layers(fam)
            per_run = max(1, 64 // n)
            for start in range(0, len(layers), per_run):
                chunk = layers[start : start + per_run]
                big = repeat_rows(self.prepared, len(chunk))
                bounds = [
                    Bound(Site(fam.name, layer), Perturb(seed=i + 1), rows=slice(i * n, i * n + 1))
                    for i, layer in enumerate(chunk)
                ]
                label = f"a write at {fam.name}" + ("" if fam.layers is None else f" layers {chunk[0]}..{chunk[-1]}")
                try:
                    out = self._execute(label, big, bounds).output
                except Exception as err:
                    problems.append(self.about(fam.name, f"{fam.name}: writing a perturbed value raised {fmt_exc(err)}"))
                    break
                if not batch_first or out.shape[0] != n * len(chunk):  # rows cannot be told apart
                    base = self._execute(f"{label}, without the write", big).output
                    if close(out, base, self.atol):
                        problems.append(self.about(fam.name, f"{fam.name}: writing perturbed values left the output unchanged", DEAD_END))
                    continue
                for i, layer in enumerate(chunk):
                    key = site_key(fam.name, layer)
                    block = out[i * n : (i + 1) * n]
                    if close(block[0], plain[0], self.atol):
                        problems.append(self.about(key,
                            f"{key}: writing a perturbed value (row 0) left the output unchanged: the reach ignores "
                            f"the value the callback returns, or the site does not reach the output (a dead end, "
                            f"such as a posterior's log-variance when the mean is decoded: skip it with "
                            f"skip=['writes:{fam.name}'])", DEAD_END
                        ))
                    if n > 1 and not close(block[1:], plain[1:], self.atol):
                        problems.append(self.about(key,
                            f"{key}: a write bound to row 0 also changed the output of other rows "
                            f"({max_diff(block[1:], plain[1:])}); writes must stay in their rows"
                        ))
        return problems
