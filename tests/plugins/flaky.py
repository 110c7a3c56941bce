"""A backend plugin whose probes fail for chosen tokens, the way a rate-limited API does:
the hf backend, with ``FAIL`` naming the tokens whose requests fail and ``ASKED`` recording
every token probed."""

from __future__ import annotations

from backends.hf import HFBackend
from harness.backend import ProbeResult
from harness.hookspecs import hookimpl

FAIL: set[int] = set()
ASKED: list[int] = []


class Flaky(HFBackend):
    """Fails every probe of a token in ``FAIL`` with a reason."""

    name = "flaky"

    def probe(self, requests):
        ASKED.extend(r.target for r in requests)
        ok = [r for r in requests if r.target not in FAIL]
        answers = iter(super().probe(ok))
        return [ProbeResult(error="HTTP 429: rate limited") if r.target in FAIL
                else next(answers) for r in requests]


@hookimpl
def register_backends(register):
    register("flaky", Flaky)
