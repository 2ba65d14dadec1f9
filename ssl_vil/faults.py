"""Fault injection for reliability tests, driven by one environment variable.

``SSL_VIL_FAULT="site:key=value,key=value;site2:..."`` activates faults at named sites. Sites used by the
project: ``ckpt_write`` (checkpoint writer), ``loss`` (objective terms), ``grad`` (gradients), ``signal``
(preemption), ``data`` (stream), ``sleep`` (hang watchdog). Production code asks ``get_fault(site)`` at the
site and acts only when it returns a dict, so a run without the variable pays one dict lookup.
"""

from __future__ import annotations

import os

ENV_VAR = "SSL_VIL_FAULT"


def parse_faults(spec: str) -> dict[str, list[dict[str, str]]]:
    """Parse ``"site:k=v,k=v;site2:k=v;site:k=v"`` into ``{site: [{k: v}, ...]}`` (a site may repeat).

    A site may appear without arguments (``"ckpt_write"``). Malformed specs raise ``ValueError`` naming the
    offending part, so a typo in a test never silently disables a fault.
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


def get_fault(site: str) -> dict[str, str] | None:
    """Arguments of the first fault planted at ``site``, or None when no fault is planted there."""
    spec = os.environ.get(ENV_VAR, "")
    if not spec:
        return None
    found = parse_faults(spec).get(site)
    return found[0] if found else None


def fault_matches(site: str, *, step: int | None = None, rank: int | None = None) -> dict[str, str] | None:
    """The first fault at ``site`` whose optional ``step=`` / ``steps=a|b|c`` / ``rank=`` filters match."""
    spec = os.environ.get(ENV_VAR, "")
    if not spec:
        return None
    for args in parse_faults(spec).get(site, []):
        if step is not None:
            if "step" in args and int(args["step"]) != step:
                continue
            if "steps" in args and step not in {int(s) for s in args["steps"].split("|")}:
                continue
        if rank is not None and "rank" in args and int(args["rank"]) != rank:
            continue
        return args
    return None


def maybe_kill(where: str, *, step: int, rank: int) -> None:
    """Test hook: ``SSL_VIL_FAULT=kill:step=N,rank=R,at=WHERE`` SIGKILLs this process at ``WHERE`` of step N.

    Sites: ``after_checkpoint`` (right after step N's save), ``mid_step`` (after step N's optimizer step, before
    anything else), ``accumulation`` (between two micro-batches of step N).
    """
    args = fault_matches("kill", step=step, rank=rank)
    if args is not None and args.get("at", "mid_step") == where:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
