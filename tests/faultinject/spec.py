"""The ``SSL_VIL_FAULT`` syntax: ``"site:key=value,key=value;site2:..."`` (a site may repeat).

Sites: ``kill`` (``at=mid_step|after_checkpoint|accumulation``), ``signal``, ``sleep``, ``loss``, ``grad`` and
``ckpt_write``. Every site accepts the filters ``step=N``, ``steps=a|b|c`` and ``rank=R``.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from typing import NoReturn

ENV_VAR = "SSL_VIL_FAULT"

log = logging.getLogger("faultinject")


def parse_faults(spec: str) -> dict[str, list[dict[str, str]]]:
    """Parse ``"site:k=v,k=v;site2:k=v;site:k=v"`` into ``{site: [{k: v}, ...]}``.

    A site may appear without arguments (``"ckpt_write"``). A malformed spec raises ``ValueError`` naming the
    offending part, so a typo never silently disables a fault.
    """
    faults: dict[str, list[dict[str, str]]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        site, _, args = part.partition(":")
        site = site.strip()
        if not site:
            raise ValueError(f"{ENV_VAR}: empty site name in {part!r}")
        kv: dict[str, str] = {}
        for item in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"{ENV_VAR}: expected key=value in {part!r}, got {item!r}")
            kv[key.strip()] = value.strip()
        faults.setdefault(site, []).append(kv)
    return faults


@functools.lru_cache(maxsize=16)
def _parsed(spec: str) -> dict[str, list[dict[str, str]]]:
    return parse_faults(spec)


def fault_matches(site: str, *, step: int | None = None, rank: int | None = None) -> dict[str, str] | None:
    """The first fault at ``site`` (read from the environment now) whose ``step`` / ``steps`` / ``rank`` match."""
    spec = os.environ.get(ENV_VAR, "")
    if not spec:
        return None
    for args in _parsed(spec).get(site, []):
        if step is not None:
            if "step" in args and int(args["step"]) != step:
                continue
            if "steps" in args and step not in {int(s) for s in args["steps"].split("|")}:
                continue
        if rank is not None and "rank" in args and int(args["rank"]) != rank:
            continue
        return dict(args)
    return None


def process_rank() -> int:
    """This process's rank: the process group's when one is initialized, else ``$RANK``, else 0."""
    dist = sys.modules.get("torch.distributed")  # no process group can exist before torch is imported
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def kill_self(reason: str) -> NoReturn:
    """Die the way a preempted or OOM-killed node does: SIGKILL, no cleanup, no ``finally`` blocks."""
    log.warning("fault injection (%s): %s; sending SIGKILL to pid %d", ENV_VAR, reason, os.getpid())
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: SIGKILL did not terminate the process")
