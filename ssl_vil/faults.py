"""Fault injection for reliability tests, driven by one environment variable.

``SSL_VIL_FAULT="site:key=value,key=value;site2:..."`` activates faults at named sites. Sites used by the
project: ``ckpt_write`` (checkpoint writer), ``loss`` (objective terms), ``grad`` (gradients), ``signal``
(preemption), ``data`` (stream), ``sleep`` (hang watchdog). Production code asks ``get_fault(site)`` at the
site and acts only when it returns a dict, so a run without the variable pays one dict lookup.
"""

from __future__ import annotations

import os

ENV_VAR = "SSL_VIL_FAULT"


def parse_faults(spec: str) -> dict[str, dict[str, str]]:
    """Parse ``"site:k=v,k=v;site2:k=v"`` into ``{site: {k: v}}``.

    A site may appear without arguments (``"ckpt_write"``). Malformed specs raise ``ValueError`` naming the
    offending part, so a typo in a test never silently disables a fault.
    """
    faults: dict[str, dict[str, str]] = {}
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
        faults[site] = kv
    return faults


def get_fault(site: str) -> dict[str, str] | None:
    """Arguments of the fault planted at ``site``, or None when no fault is planted there."""
    spec = os.environ.get(ENV_VAR, "")
    if not spec:
        return None
    return parse_faults(spec).get(site)


def fault_matches(site: str, *, step: int | None = None, rank: int | None = None) -> dict[str, str] | None:
    """Like :func:`get_fault`, but only when its optional ``step=`` / ``rank=`` / ``steps=a|b|c`` filters match."""
    args = get_fault(site)
    if args is None:
        return None
    if step is not None:
        if "step" in args and int(args["step"]) != step:
            return None
        if "steps" in args and step not in {int(s) for s in args["steps"].split("|")}:
            return None
    if rank is not None and "rank" in args and int(args["rank"]) != rank:
        return None
    return args
