"""A backend plugin that writes down every probe it is asked for: the hf backend, appending
``pid token prompt`` lines to the file ``$PROBE_LOG`` (``prompt``: a digest of the
request's prompt with the token blanked out, which tells the prompts apart) and waiting
``$PROBE_DELAY`` seconds per call, so that a test can kill a scan midway and see which
process probed what."""

from __future__ import annotations

import hashlib
import os
import time

from backends.hf import HFBackend
from harness.hookspecs import hookimpl


class ProbeLog(HFBackend):
    """Logs each probe request's token before answering it."""

    name = "probe-log"

    def probe(self, requests):
        prompts = [hashlib.sha256(str([*r.prefix, *(-1 if t == r.target else t
                                                    for t in r.ids)]).encode()).hexdigest()[:8]
                   for r in requests]
        with open(os.environ["PROBE_LOG"], "a") as log:
            log.write("".join(f"{os.getpid()} {r.target} {p}\n"
                              for r, p in zip(requests, prompts, strict=True)))
        time.sleep(float(os.environ.get("PROBE_DELAY", "0")))
        return super().probe(requests)


@hookimpl
def register_backends(register):
    register("probe-log", ProbeLog)
