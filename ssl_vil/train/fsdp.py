"""FSDP2 for the student and its EMA teacher (``train.distributed=fsdp2``), and checkpoints that stay full.

**Plan** (:func:`shard_network`). Each block of the backbone (a ViL block pair, a ViT block) is one FSDP unit,
then the backbone itself (patch and position embedding, mask token, final norm; its ``forward_features`` is
registered as an FSDP forward, since that is what the network and the k-NN monitor call), each head, and the
network as the root. Student and teacher are sharded by the same plan on one 1-D mesh over all ranks: shard i of
a teacher parameter sits beside shard i of the student parameter, so the EMA (:func:`ssl_vil.objectives.teacher.ema_update`)
runs on local shards without any communication. The root holds no parameters of its own: FSDP2 keeps a root's
parameters unsharded after its forward (the backward would gather them again), which would leave the teacher --
which has no backward -- with full root parameters beside a sharded student.

**Gradients.** FSDP2 reduce-scatters the gradients of every micro-batch (no ``no_sync``: gradients stay sharded
between micro-batches, which is what FSDP is for). ``clip_grad_norm_`` on the DTensor gradients reduces the
per-shard norms over the ranks, so clipping uses the global norm (:func:`ssl_vil.train.step.clip_per_submodule`).

**Checkpoints** (:func:`rank_agnostic_payload`). A save gathers full (unsharded) state dicts onto rank 0's CPU
(``get_model_state_dict`` / ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``); a load
broadcasts rank 0's full tensors and each rank keeps its shard (``set_model_state_dict`` /
``set_optimizer_state_dict`` with ``broadcast_from_rank0=True``). The optimizer state is stored in
``torch.optim.Optimizer.state_dict()``'s own layout (parameters by index, not by name), so the files are those
of a DDP or single-process run: a run saved under fsdp2 at one world size resumes under ddp or fsdp2 at any
other, and the other way round. Both directions are collectives: every rank saves and restores.

One process (no process group) trains the plain student whatever ``train.distributed`` says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ssl_vil.config.errors import ConfigError
from ssl_vil.infra.dist import world_size

if TYPE_CHECKING:
    from ssl_vil.objectives import SelfDistillationObjective, SSLNetwork


def require_fsdp2() -> None:
    """Raise ``ConfigError`` (key ``train.distributed``) if this torch cannot run FSDP2.

    Checked, not assumed: FSDP2 (``torch.distributed.fsdp.fully_shard``) is public from torch 2.6; this torch's
    CPU / gloo support was probed when the option was written (a 2-process gloo ``fully_shard`` forward,
    backward and optimizer step ran), and the multi-process tests run it on CPU.
    """
    if not torch.distributed.is_available():
        raise ConfigError("got 'fsdp2', but this torch was built without torch.distributed; expected 'ddp'",
                          key="train.distributed")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"got 'fsdp2', but this torch ({torch.__version__}) has no "
                          f"torch.distributed.fsdp.fully_shard ({exc}); expected 'ddp', or torch >= 2.6",
                          key="train.distributed") from None


def block_container(backbone: nn.Module) -> nn.Module:
    """The backbone's sequence of blocks (``blocks`` of a ViL, ``vit.blocks`` of a wrapped timm ViT): the first
    ``ModuleList`` / ``Sequential`` whose name ends in ``blocks``; ValueError when there is none."""
    for name, module in backbone.named_modules():
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, (nn.ModuleList, nn.Sequential)):
            return module
    raise ValueError(f"{type(backbone).__name__} has no 'blocks' ModuleList/Sequential to shard per block; "
                     "train.distributed=fsdp2 needs one")


def shard_network(net: SSLNetwork, mesh: Any) -> None:
    """``fully_shard`` ``net`` in place: each block, the backbone, each head, then ``net`` as the root."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in block_container(net.backbone):
        fully_shard(block, mesh=mesh)
    fully_shard(net.backbone, mesh=mesh)
    # SSLNetwork (and the k-NN monitor) call backbone.forward_features, not forward: register it, or its FSDP
    # hooks (all-gather before, reshard after) would not run.
    register_fsdp_forward_method(net.backbone, "forward_features")
    for head in (net.dino_head, net.ibot_head):
        if head is not None:
            fully_shard(head, mesh=mesh)
    fully_shard(net, mesh=mesh)
    own = [name for name, _ in net.named_parameters(recurse=False)]
    if own:  # see the module docstring: the root's parameters would stay unsharded in the teacher
        raise ValueError(f"{type(net).__name__} holds parameters {own} outside its backbone and heads; the FSDP2 "
                         "plan needs them inside a sharded submodule")


def shard_objective(objective: SelfDistillationObjective, device: torch.device) -> nn.Module:
    """Shard the objective's student and teacher alike over all ranks (needs a process group); returns the
    student, the module the training forward goes through."""
    require_fsdp2()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size(),))
    return objective.shard_student_and_teacher(lambda net: shard_network(net, mesh))


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` was ``fully_shard``-ed (its parameters are DTensor shards)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


# ------------------------------------------------------------------------------------------------ checkpoints
def _options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


class FullModelState:
    """``state_dict()`` / ``load_state_dict()`` of a module holding FSDP2-sharded submodules, in full tensors.

    ``state_dict()`` is collective and returns the full state on rank 0 (CPU) and ``{}`` elsewhere (only rank 0
    writes); ``load_state_dict(full)`` is collective and uses rank 0's ``full`` (every rank keeps its shard).
    Keys and key order are those of the unsharded module's own ``state_dict()``.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module, options=_options(cpu_offload=True))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, state, options=_options(broadcast_from_rank0=True))


class FullOptimizerState:
    """The optimizer of an FSDP2-sharded ``model`` as a full, index-keyed ``Optimizer.state_dict()``.

    ``get_optimizer_state_dict`` names parameters by their fully qualified name; the saved state is converted to
    (and, on load, from) the index layout of ``torch.optim.Optimizer.state_dict()``, which DDP and single-process
    runs save: one checkpoint format for every ``train.distributed`` and world size. Collective, like
    :class:`FullModelState`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        if not self.optimizer.state:
            # No step taken yet (e.g. the first steps were skipped): nothing sharded to gather. torch's helper
            # would initialise the state with a zero-lr step here, which a DDP run never does.
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(self.model, self.optimizer, options=_options(cpu_offload=True))
        return by_index(full) if full else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state["state"]:
            self.optimizer.load_state_dict(state)  # hyperparameters only; same on every rank (the same file)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, by_name(state, self._names()),
                                 options=_options(broadcast_from_rank0=True))

    def _names(self) -> list[str]:
        """The optimizer's parameters in ``state_dict()`` index order, by name in ``model``."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        try:
            return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        except KeyError:
            raise ValueError("the optimizer holds a parameter that is not in the sharded model") from None


def by_index(state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state dict (``get_optimizer_state_dict``) in ``Optimizer.state_dict()``'s layout:
    parameters numbered in param-group order, ``state`` keyed (and ordered) by that number."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        start = len(index)
        ids = list(range(start, start + len(group["params"])))
        index.update(zip(group["params"], ids))
        groups.append({k: (ids if k == "params" else v) for k, v in group.items()})
    numbered = {index[name]: value for name, value in state["state"].items()}
    return {"state": dict(sorted(numbered.items())), "param_groups": groups}


def by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Inverse of :func:`by_index`, with ``names[i]`` the name of parameter ``i``."""
    n_saved = sum(len(g["params"]) for g in state["param_groups"])
    if n_saved != len(names):
        raise ValueError(f"the checkpoint's optimizer state has {n_saved} parameters, the optimizer {len(names)}")
    groups = [{k: ([names[i] for i in v] if k == "params" else v) for k, v in g.items()}
              for g in state["param_groups"]]
    return {"state": {names[i]: value for i, value in state["state"].items()}, "param_groups": groups}


def rank_agnostic_payload(objective: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The checkpoint payload components ``objective`` and ``optimizer``: the modules themselves, or, when the
    student is sharded, adapters that save and load full state (the same files either way)."""
    student = objective.student
    if not is_sharded(student):
        return {"objective": objective, "optimizer": optimizer}
    return {"objective": FullModelState(objective), "optimizer": FullOptimizerState(student, optimizer)}


def unsharded_copy(module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """A plain (unsharded) copy of the FSDP2-sharded ``module`` on every rank: ``build()`` makes an instance of
    the same architecture, which receives the gathered full state. Collective.

    For the k-NN monitor: it runs the teacher backbone on each rank's share of the evaluation data, and the
    shares may differ in batch count, so a sharded forward (one all-gather per unit and batch) could hang.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=_options())  # full tensors on every rank
    device = next(iter(state.values())).device
    with torch.random.fork_rng(devices=[]):  # building draws initial values; the training streams must not move
        copy = build()
    copy.load_state_dict(state)
    return copy.to(device)
