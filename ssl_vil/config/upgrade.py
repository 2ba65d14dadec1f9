"""Configs that earlier versions of ssl_vil recorded (a run's ``config.yaml``, a checkpoint manifest's config),
read as the current schema, so their runs still resume, evaluate and fine-tune.

User-written recipes are not upgraded: an old key there is refused with the message in
:data:`ssl_vil.config.load.MOVED_KEYS`, so a recipe says what it means. A record is what a run computed with, so
it is translated to the settings that reproduce that computation:

* ``objective.name`` chose the loss terms and silently zeroed the others: ``dino`` -> ``ibot_weight = koleo_weight
  = 0`` (and no iBOT head), ``ibot`` -> ``koleo_weight = 0``, ``dinov2`` -> the weights as recorded;
* head keys ``nlayers`` / ``batchnorm`` -> ``n_layers`` / ``batch_norm``; ``centering: sinkhorn`` ->
  ``sinkhorn_knopp``;
* ``objective.mask_*`` -> the ``masking`` section (``mask_ratio_min`` / ``_max`` -> ``masking.mask_ratio``);
* ``eval.knn_*`` -> ``knn_monitor.*``;
* keys that never had an effect are dropped: ``optim.name`` (always AdamW), ``train.grad_scaler`` (no scaler
  existed; fp16 now always scales), ``logging.keys_log`` (a test hook).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

_HEAD_KEYS = {"nlayers": "n_layers", "batchnorm": "batch_norm"}
_MASK_KEYS = {"mask_probability": "mask_probability", "mask_mode": "mode"}
_DROPPED = (("optim", "name"), ("train", "grad_scaler"), ("logging", "keys_log"))


def upgrade_record(record: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(record in the current layout, one note per change)``; a current record comes back equal, without notes.

    ``record``: the nested dict of a resolved run config (as ``to_dict`` writes it); it is not modified.
    """
    data: dict[str, Any] = copy.deepcopy(dict(record))
    notes: list[str] = []
    old_eval = data.pop("eval", None)
    if isinstance(old_eval, dict):
        monitor = data.setdefault("knn_monitor", {})
        for key, value in old_eval.items():
            monitor[key.removeprefix("knn_")] = value
        notes.append("eval.knn_* -> knn_monitor.*")
    objective = data.get("objective")
    if isinstance(objective, dict):
        _upgrade_objective(objective, data, notes)
    for section, key in _DROPPED:
        if isinstance(data.get(section), dict) and key in data[section]:
            del data[section][key]
            notes.append(f"{section}.{key} dropped (it had no effect)")
    return data, notes


def _upgrade_objective(objective: dict[str, Any], data: dict[str, Any], notes: list[str]) -> None:
    for head in ("dino_head", "ibot_head"):
        if isinstance(objective.get(head), dict):
            for old, new in _HEAD_KEYS.items():
                if old in objective[head]:
                    objective[head][new] = objective[head].pop(old)
                    notes.append(f"objective.{head}.{old} -> {new}")
    name = objective.pop("name", None)
    if name is not None:
        if name == "dino":
            objective.update(ibot_weight=0.0, koleo_weight=0.0, ibot_head=None)
        elif name == "ibot":
            objective["koleo_weight"] = 0.0
        notes.append(f"objective.name={name} -> ibot_weight={objective.get('ibot_weight')}, "
                     f"koleo_weight={objective.get('koleo_weight')}")
    if objective.get("centering") == "sinkhorn":
        objective["centering"] = "sinkhorn_knopp"
        notes.append("objective.centering: sinkhorn -> sinkhorn_knopp")
    masking = {new: objective.pop(old) for old, new in _MASK_KEYS.items() if old in objective}
    if "mask_ratio_min" in objective or "mask_ratio_max" in objective:
        masking["mask_ratio"] = [objective.pop("mask_ratio_min", 0.1), objective.pop("mask_ratio_max", 0.5)]
    if masking:
        data.setdefault("masking", {}).update(masking)
        notes.append("objective.mask_* -> masking.*")
