"""Fine-tuning: layer-decay lr scales per ViL block pair, a digits epoch end to end, the step guard (non-finite
skip / halt), exact resume after SIGKILL and after a preemption save."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssl_vil.checkpoint import CheckpointManager
from ssl_vil.config import ConfigError
from ssl_vil.eval import finetune_setup as ft
from ssl_vil.eval.finetune_config import load_finetune_config
from ssl_vil.infra.files import read_jsonl

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "finetune_digits.yaml"
TINY = "{img_size: 16, patch_size: 4, dim: 32, depth: 2, mlstm_backend: parallel}"


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    """Digits train (1297) / val (500) shards in one directory, shared by the eval tests (make_shards is idempotent)."""
    from ssl_vil.data import make_shards

    root = tmp_path_factory.getbasetemp() / "eval_digits_shards"
    for split in ("train", "val"):
        assert make_shards.main(["builtin:digits", str(root), "--split", split, "--maxcount", "200"]) == 0
    return root


def _tiny_overrides(shards: Path, *extra: str) -> list[str]:
    return [f"data.train={shards}", f"data.val={shards}", "model.name=vil2_tiny_patch16_224",
            f"model.kwargs={TINY}", "data.mean=[0.3,0.3,0.3]", "data.std=[0.4,0.4,0.4]", "data.num_workers=0",
            *extra]


def _timm_cosine(t: int, *, base: float, warmup_lr: float, min_lr: float, warmup_t: int, total_t: int) -> float:
    """timm's CosineLRScheduler (warmup_prefix=False, one cycle), written out independently."""
    if t < warmup_t:
        return warmup_lr + t * (base - warmup_lr) / warmup_t
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / total_t))


def _expected_pair_scale(name: str, decay: float, depth: int) -> float:
    """Stem -> decay^(depth+1), block pair i -> decay^(depth-i), final norm with the last pair, head -> 1."""
    if name.startswith(("patch_embed.", "pos_embed.")):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    elif name.startswith("norm."):
        layer = depth
    else:  # head.*, legacy_norm.* (pre-head norm)
        layer = depth + 1
    return decay ** (depth + 1 - layer)


@pytest.mark.parametrize("step", [0, 3, 7, 14])
def test_layer_decay_scales_seen_by_optimizer(step):
    cfg = load_finetune_config(RECIPE, _tiny_overrides(Path("unused"), "optim.layer_decay=0.6", "optim.lr=0.01",
                                                      "schedule.train_epochs=3", "schedule.warmup_epochs=1",
                                                      "schedule.warmup_lr=1e-4", "schedule.min_lr=1e-5"))
    model, _ = ft.build_model(cfg, num_classes=10)
    optimizer = ft.build_optimizer(model, cfg, lr=0.01)
    steps_per_epoch = 5
    scheduler = ft.build_scheduler(optimizer, cfg, steps_per_epoch)
    scheduler.step_update(num_updates=step)
    sched_lr = _timm_cosine(step, base=0.01, warmup_lr=1e-4, min_lr=1e-5, warmup_t=5, total_t=15)
    names = {id(p): n for n, p in model.named_parameters()}
    seen_scales = set()
    covered = 0
    for group in optimizer.param_groups:
        expected = {_expected_pair_scale(names[id(p)], 0.6, depth=2) for p in group["params"]}
        assert len(expected) == 1, f"group mixes layers: {[names[id(p)] for p in group['params']]}"
        scale = expected.pop()
        assert group["lr"] == pytest.approx(sched_lr * scale, rel=1e-12), [names[id(p)] for p in group["params"]]
        seen_scales.add(round(scale, 12))
        covered += len(group["params"])
        # weight decay only on >= 2-D weights that are not the position embedding
        for p in group["params"]:
            decays = p.ndim >= 2 and names[id(p)] != "pos_embed.embed"
            assert (group["weight_decay"] > 0) == decays, names[id(p)]
    assert covered == len(list(model.parameters()))
    assert seen_scales == {round(0.6**k, 12) for k in range(4)}  # stem, pair 0, pair 1, head


def test_pretrained_backbone_is_copied_and_head_is_fresh(tmp_path):
    from test_eval_knn_cli import export_random_vil

    from ssl_vil.export import load_pretrained_backbone

    weights = export_random_vil(tmp_path / "export", seed=3)
    backbone, _ = load_pretrained_backbone(weights)
    for img_size in (32, 48):  # the pretraining size, and a larger fine-tuning size (pos_embed resized)
        cfg = load_finetune_config(RECIPE, [f"model.weights={weights}", f"data.img_size={img_size}"])
        model, info = ft.build_model(cfg, num_classes=7)
        assert info["model"] == "vil2_tiny_patch16_224" and model.head.out_features == 7
        state, pretrained = model.state_dict(), backbone.state_dict()
        assert set(state) - set(pretrained) == {"head.weight", "head.bias"}
        for key, value in pretrained.items():
            if key == "pos_embed.embed":
                assert state[key].shape == (1, img_size // 4, img_size // 4, 64)
            else:
                assert torch.equal(state[key], value), key
        assert model.blocks[1].rowwise_from_top_left.drop_path.drop_prob == cfg.model.drop_path_rate == 0.05


def test_model_kwargs_override_the_pretrained_architecture_for_stride_8(tmp_path):
    """Long-sequence fine-tuning: the pretrained stride-16 weights in a stride-8 model (same patch kernel)."""
    from test_eval_knn_cli import export_random_vil

    from ssl_vil.export import load_pretrained_backbone

    weights = export_random_vil(tmp_path / "export", seed=3)
    backbone, _ = load_pretrained_backbone(weights)
    cfg = load_finetune_config(RECIPE, [f"model.weights={weights}", "model.kwargs={stride: 2}"])
    model, _ = ft.build_model(cfg, num_classes=7)
    assert model.stride == 2 and backbone.stride == 4
    assert model.grid_size((32, 32)) == (15, 15) and backbone.grid_size((32, 32)) == (8, 8)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in backbone.state_dict().items())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_config_errors_name_the_key():
    named = ["model.name=vil2_tiny_patch16_224"]
    with pytest.raises(ConfigError, match="optim.lrr: unknown key; did you mean optim.lr"):
        load_finetune_config(RECIPE, [*named, "optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match="data.batch_size: got 33, expected an even number"):
        load_finetune_config(RECIPE, [*named, "data.batch_size=33", "mixup.prob=1.0", "mixup.mixup_alpha=0.8"])
    with pytest.raises(ConfigError, match="schedule.warmup_epochs"):
        load_finetune_config(RECIPE, [*named, "schedule.warmup_epochs=20"])
    with pytest.raises(ConfigError, match="optim.base_lr: got 'fast', expected float"):
        load_finetune_config(RECIPE, [*named, "optim.base_lr=fast"])
    with pytest.raises(ConfigError, match="model.name: got None"):
        load_finetune_config(RECIPE, [])


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("finetune_*.yaml")))
def test_every_finetune_recipe_loads_and_documents_itself(recipe):
    path = REPO / "recipes" / recipe
    cfg = load_finetune_config(path, ["model.weights=runs/some_run"])
    head = path.read_text().splitlines()[:12]
    assert head[0].startswith("# "), "a recipe starts with a comment"
    text = "\n".join(head).lower()
    assert f"eval/finetune.py --config recipes/{recipe}" in text  # the exact command
    assert "hardware / wall time" in text and "anchors" in text
    assert cfg.schedule.train_epochs >= 1


def test_one_epoch_on_digits_shards(digits_shards, tmp_path, capsys):
    from ssl_vil.eval.finetune import main

    torch.set_num_threads(1)
    res = main(["--config", str(RECIPE), "--output-dir", str(tmp_path),
                *_tiny_overrides(digits_shards, "schedule.train_epochs=1", "schedule.warmup_epochs=0",
                                 "train.eval_every_epochs=1", "optim.lr=3e-3")])
    assert res["steps"] == 20 and res["steps_per_epoch"] == 1297 // 64
    assert res["final"]["n_val"] == 500  # every val sample exactly once
    assert res["num_classes"] == 10
    log = read_jsonl(tmp_path / ft.TRAIN_LOG)
    losses = [r["loss"] for r in log if "event" not in r]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    # It learns within one epoch: clearly better than chance (10 %) on val.
    assert res["final"]["top1"] > 20.0, res["final"]
    assert (tmp_path / "checkpoints" / "step_00000020").is_dir()
    assert (tmp_path / ft.RESULTS_FILE).is_file()
    # TensorBoard through the pretraining trainer's scalar board: every step's loss, the evaluation.
    from test_guards_metrics_log import tb_scalars

    assert tb_scalars(tmp_path, "loss/")["loss/loss"] == [(step, pytest.approx(loss)) for step, loss in
                                                          enumerate(losses, start=1)]
    assert tb_scalars(tmp_path, "eval/")["eval/top1"] == [(20, pytest.approx(res["final"]["top1"]))]

    # Resuming it with another lr is refused in one line naming the key; nothing in the output dir changes.
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(RECIPE), "--output-dir", str(tmp_path),
              *_tiny_overrides(digits_shards, "schedule.train_epochs=2", "schedule.warmup_epochs=0",
                               "train.eval_every_epochs=1", "optim.lr=1e-3")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # Only the lr is listed: extending the run (schedule.train_epochs) is allowed.
    assert err.split("these keys differ: ")[1].split(". Keys that may change")[0] == "optim.lr: run has 0.003, now 0.001"
    assert len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def _ft_command(shards: Path, out: Path) -> list[str]:
    # Every random part is on: RandAugment, random erasing, mixup/cutmix, drop path, EMA.
    return [sys.executable, str(REPO / "eval" / "finetune.py"), "--config", str(RECIPE), "--output-dir", str(out),
            *_tiny_overrides(shards, "schedule.train_epochs=1", "schedule.warmup_epochs=0", "data.batch_size=64",
                             "train.checkpoint_every_steps=5", "train.eval_every_epochs=1",
                             "mixup.mixup_alpha=0.8", "mixup.cutmix_alpha=1.0", "mixup.prob=1.0",
                             "augment.re_prob=0.25", "model.drop_path_rate=0.1", "ema.enabled=true",
                             "ema.decay=0.9", "train.precision=fp32", "train.device=cpu")]


@pytest.mark.slow
def test_resume_after_sigkill_and_preemption_continues_exactly(digits_shards, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    subprocess.run(_ft_command(digits_shards, ref_dir), check=True, env=env, cwd=REPO, capture_output=True)
    reference = [r for r in read_jsonl(ref_dir / ft.TRAIN_LOG) if "event" not in r]
    assert [r["step"] for r in reference] == list(range(1, 21))

    proc = subprocess.Popen(_ft_command(digits_shards, run_dir), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = run_dir / "checkpoints" / "LATEST"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() == "step_00000010":
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_log = [r for r in read_jsonl(run_dir / ft.TRAIN_LOG) if "event" not in r]
    assert 10 <= len(killed_log) < 20  # killed mid-epoch, after the step-10 checkpoint

    # Resumed, then preempted: SIGUSR2 saves at the next step boundary and exits 75 (the launcher requeues on it).
    proc = subprocess.Popen(_ft_command(digits_shards, run_dir), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if '"step": 11,' in (run_dir / ft.TRAIN_LOG).read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    assert "preempted: checkpoint saved; resume with: python eval/finetune.py --config" in err
    [stop] = [r for r in read_jsonl(run_dir / ft.TRAIN_LOG) if r.get("event") == "preempted"]
    assert 11 <= stop["step"] < 20 and stop["exit_code"] == 75
    assert latest.read_text().strip() == f"step_{stop['step']:08d}"

    subprocess.run(_ft_command(digits_shards, run_dir), check=True, env=env, cwd=REPO, capture_output=True)
    resumed = [r for r in read_jsonl(run_dir / ft.TRAIN_LOG) if "event" not in r]
    assert [r["step"] for r in resumed] == list(range(1, 21))
    # Bitwise-equal losses and lrs for every step, before and after the resume point.
    assert [(r["loss"], r["lr"]) for r in resumed] == [(r["loss"], r["lr"]) for r in reference]
    ref_eval = [r for r in read_jsonl(ref_dir / ft.TRAIN_LOG) if r.get("event") == "eval"]
    run_eval = [r for r in read_jsonl(run_dir / ft.TRAIN_LOG) if r.get("event") == "eval"]
    assert run_eval == ref_eval and len(ref_eval) == 1
    ref_state = torch.load(ref_dir / "checkpoints" / "step_00000020" / "model.pt", weights_only=True)
    run_state = torch.load(run_dir / "checkpoints" / "step_00000020" / "model.pt", weights_only=True)
    assert ref_state.keys() == run_state.keys()
    assert all(torch.equal(ref_state[k], run_state[k]) for k in ref_state)
    # TensorBoard, too, shows each step once, with the uninterrupted run's values.
    from test_guards_metrics_log import tb_scalars

    assert tb_scalars(run_dir, "loss/") == tb_scalars(ref_dir, "loss/")
    assert [step for step, _ in tb_scalars(run_dir, "loss/")["loss/loss"]] == list(range(1, 21))


@pytest.mark.slow
def test_a_checkpoint_of_the_earlier_flat_layout_resumes_exactly(digits_shards, tmp_path):
    """Run dirs written before fine-tuning used the trainer's checkpointer hold one flat payload (model, optimizer,
    ema, data, config, history and the guards side by side, no train_state): they resume, bitwise."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ref_dir, old_dir = tmp_path / "uninterrupted", tmp_path / "old_layout"
    subprocess.run(_ft_command(digits_shards, ref_dir) + ["train.keep_last=4"], check=True, env=env, cwd=REPO,
                   capture_output=True)

    # The step-10 checkpoint rewritten as the earlier code wrote it, in a run dir that holds only it.
    current = CheckpointManager.load_folder(ref_dir / "checkpoints" / "step_00000010")
    st = current.payload["train_state"]
    flat = {"model": current.payload["model"], "optimizer": current.payload["optimizer"],
            "data": st["data"], "config": current.manifest["metadata"]["config"],
            "history": st["history"]["records"], "finite_guard": st["finite_guard"],
            "spike_guard": st["spike_guard"], "ema": current.payload["ema"]}
    old_dir.mkdir()
    manager = CheckpointManager(old_dir, keep_last=3, keep_every_steps=None,
                                config_hash=current.manifest["config_hash"], world_size=1, git_sha=None)
    manager.save(10, flat, metadata={"epoch": 0, "batches_consumed": 10})
    log = [r for r in read_jsonl(ref_dir / ft.TRAIN_LOG) if r.get("step", 0) <= 10]
    (old_dir / ft.TRAIN_LOG).write_text("".join(json.dumps(r) + "\n" for r in log))

    done = subprocess.run(_ft_command(digits_shards, old_dir), env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    reference, resumed = (read_jsonl(d / ft.TRAIN_LOG) for d in (ref_dir, old_dir))
    assert [(r["step"], r["loss"], r["lr"]) for r in resumed if "event" not in r] == \
           [(r["step"], r["loss"], r["lr"]) for r in reference if "event" not in r]
    assert [r for r in resumed if r.get("event") == "eval"] == [r for r in reference if r.get("event") == "eval"]
    for name in ("model.pt", "ema.pt"):
        ref_state, run_state = (torch.load(d / "checkpoints" / "step_00000020" / name, weights_only=True)
                                for d in (ref_dir, old_dir))
        assert ref_state.keys() == run_state.keys() and all(torch.equal(ref_state[k], run_state[k])
                                                             for k in ref_state), name
    # Saved again in the current layout.
    assert (old_dir / "checkpoints" / "step_00000020" / "train_state.pt").exists()


class _NaNOnCalls(torch.nn.Module):
    """The recipe's criterion, returning NaN on the given (1-based) calls: a fault injected from outside."""

    def __init__(self, inner: torch.nn.Module, bad_calls: set[int]) -> None:
        super().__init__()
        self.inner, self.bad_calls, self.calls = inner, bad_calls, 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.inner(logits, target)
        return loss * float("nan") if self.calls in self.bad_calls else loss


def _inject_nan(monkeypatch, bad_calls: set[int]) -> None:
    from ssl_vil.eval import finetune_loop

    original = finetune_loop._Run._loss

    def patched(self):
        mixup, criterion = original(self)
        return mixup, _NaNOnCalls(criterion, bad_calls)

    monkeypatch.setattr(finetune_loop._Run, "_loss", patched)


def test_a_nonfinite_step_is_skipped_by_the_step_guard(digits_shards, tmp_path, monkeypatch):
    from ssl_vil.eval.finetune import main

    torch.set_num_threads(1)
    _inject_nan(monkeypatch, {3})
    res = main(["--config", str(RECIPE), "--output-dir", str(tmp_path),
                *_tiny_overrides(digits_shards, "schedule.train_epochs=1", "schedule.warmup_epochs=0",
                                 "optim.lr=3e-3", "train.eval_every_epochs=1")])
    assert res["steps"] == 20
    log = read_jsonl(tmp_path / ft.TRAIN_LOG)
    steps = [r for r in log if "event" not in r]
    assert [r["step"] for r in steps if r["skipped"]] == [3]
    assert math.isnan(steps[2]["loss"]) and all(math.isfinite(r["loss"]) for r in steps if r["step"] != 3)
    assert [(r["step"], r["nonfinite"]) for r in log if r.get("event") == "step_skipped"] == [(3, 1.0)]
    # The skipped step never reached the optimizer: AdamW counted 19 updates of every parameter.
    state = CheckpointManager.load_folder(tmp_path / "checkpoints" / "step_00000020").payload["optimizer"]
    assert {int(s["step"]) for s in state["state"].values()} == {19}
    assert res["final"]["top1"] > 20.0


def test_halt_policy_stops_with_the_guard_exit_code_and_one_line(digits_shards, tmp_path, monkeypatch, capsys):
    from ssl_vil.eval.finetune import GUARD_EXIT_CODE, main

    torch.set_num_threads(1)
    _inject_nan(monkeypatch, {2})
    code = main(["--config", str(RECIPE), "--output-dir", str(tmp_path),
                 *_tiny_overrides(digits_shards, "schedule.train_epochs=1", "schedule.warmup_epochs=0",
                                  "guards.nonfinite_policy=halt")])
    assert code == GUARD_EXIT_CODE == 3
    err = capsys.readouterr().err
    assert "fine-tuning stopped" in err and "step 1" in err and "Traceback" not in err
    assert [r["step"] for r in read_jsonl(tmp_path / ft.TRAIN_LOG) if "event" not in r] == [1]


def test_imagefolder_train_stream_is_exactly_once_and_resumes(tmp_path):
    from test_eval_knn_cli import _image_folder_from_digits
    from timm.data import create_transform

    from ssl_vil.eval.train_inputs import open_train_stream

    _image_folder_from_digits(tmp_path, n_train=100, n_val=0)
    root = str(tmp_path / "train")
    transform = create_transform(16, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5,
                                 interpolation="bicubic")

    def stream(rank: int, world: int = 2):
        return open_train_stream(root, transform=transform, batch_size=8, seed=5, rank=rank, world_size=world,
                                 num_workers=0)

    ranks = [stream(0), stream(1)]
    assert ranks[0].batches_per_epoch == 100 // 16
    epoch0 = [list(s) for s in ranks]  # one epoch each
    keys = [k for batches in epoch0 for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 6 * 16  # every sample at most once; the ragged tail is dropped
    assert ranks[0].epoch == 1 and ranks[0].batches_consumed == 0
    epoch1_keys = [k for b in ranks[0] for k in b["keys"]]
    assert epoch1_keys != [k for b in epoch0[0] for k in b["keys"]]  # a new order every epoch

    # Resume after 3 batches of epoch 0 in a fresh stream (another "process"): the same keys and the same
    # augmented pixels as an uninterrupted pass.
    interrupted = stream(1)
    it = iter(interrupted)
    for _ in range(3):
        next(it)
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches_consumed"]) == (0, 3)
    resumed = stream(1)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b["batch_in_epoch"] for b in rest] == [3, 4, 5]
    for got, want in zip(rest, epoch0[1][3:]):
        assert got["keys"] == want["keys"]
        assert torch.equal(got["views"], want["views"]) and torch.equal(got["labels"], want["labels"])
    with pytest.raises(ValueError, match="global_batch_size"):
        stream(0, world=1).load_state_dict(state)
