"""SpikeGuard (z-score vs accepted history) and CollapseDetector (teacher entropy near ln K)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ssl_vil.train.guards import CollapseDetector, CollapseError, SpikeGuard


def clean_series(n_steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A decaying loss with Gaussian noise and a log-normal grad norm: what a healthy run looks like."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_steps)
    loss = 2.0 + 4.0 * np.exp(-t / 400) + 0.05 * rng.standard_normal(n_steps)
    grad_norm = (0.8 + 0.6 * np.exp(-t / 300)) * np.exp(0.1 * rng.standard_normal(n_steps))
    return loss, grad_norm


def run(guard: SpikeGuard, loss: np.ndarray, grad_norm: np.ndarray, start: int = 0) -> list[int]:
    """Steps the guard flags."""
    return [s for s in range(start, len(loss)) if guard.check(float(loss[s]), float(grad_norm[s]), step=s)]


def test_clean_run_of_2000_steps_has_no_false_positive():
    loss, grad_norm = clean_series(2000, seed=0)
    guard = SpikeGuard(window=50, z_threshold=6.0, min_history=20)
    assert run(guard, loss, grad_norm) == []
    assert guard.flagged_total == 0


@pytest.mark.parametrize("which", ["loss", "grad_norm", "both"])
def test_x50_spike_at_step_200_is_flagged_exactly_once(which):
    loss, grad_norm = clean_series(2000, seed=1)
    if which in ("loss", "both"):
        loss[200] *= 50
    if which in ("grad_norm", "both"):
        grad_norm[200] *= 50
    guard = SpikeGuard()
    flagged = []
    for s in range(2000):
        if s == 200:
            history = np.array(guard.state_dict()[which if which != "both" else "loss"])
        if guard.check(float(loss[s]), float(grad_norm[s]), step=s):
            flagged.append(s)
            z_at_spike = dict(guard.last_z)
    assert flagged == [200]
    # Independent reference: z-score against the 50 accepted steps before the spike (sample std).
    series = {"loss": loss, "grad_norm": grad_norm, "both": loss}[which]
    key = "loss" if which == "both" else which
    assert np.array_equal(history, series[150:200])
    expected_z = (series[200] - history.mean()) / history.std(ddof=1)
    assert z_at_spike[key] == pytest.approx(expected_z, rel=1e-9)
    # The spike never entered the history.
    assert series[200] not in guard.state_dict()[key]


def test_no_verdict_before_min_history():
    loss, grad_norm = clean_series(100, seed=2)
    loss[5] *= 50
    loss[60] *= 50
    guard = SpikeGuard(window=50, z_threshold=6.0, min_history=20)
    assert run(guard, loss, grad_norm) == [60]


def test_non_finite_input_is_flagged_and_kept_out_of_history():
    loss, grad_norm = clean_series(60, seed=3)
    loss[40] = math.nan
    grad_norm[50] = math.inf
    guard = SpikeGuard()
    assert run(guard, loss, grad_norm) == [40, 50]
    assert all(math.isfinite(x) for x in guard.state_dict()["loss"] + guard.state_dict()["grad_norm"])


def test_state_dict_round_trip_gives_identical_verdicts():
    loss, grad_norm = clean_series(2000, seed=4)
    for s in (1200, 1500, 1501):
        loss[s] *= 50
    reference = SpikeGuard()
    reference_flags = run(reference, loss, grad_norm)

    first = SpikeGuard()
    assert run(first, loss[:1000], grad_norm[:1000]) == []
    state = json.loads(json.dumps(first.state_dict()))  # must survive serialisation
    resumed = SpikeGuard()
    resumed.load_state_dict(state)
    resumed_flags = run(resumed, loss, grad_norm, start=1000)
    assert resumed_flags == reference_flags == [1200, 1500, 1501]
    assert resumed.state_dict() == reference.state_dict()


def test_a_lasting_level_change_is_skipped_only_max_consecutive_times():
    loss, grad_norm = clean_series(600, seed=5)
    grad_norm[300:] *= 10  # the grad norm moves to a new level and stays there
    loss[450:453] *= 50  # later, a real 3-step spike on the new level
    guard = SpikeGuard(window=50, z_threshold=6.0, min_history=20, max_consecutive=5)
    assert run(guard, loss[:306], grad_norm[:306]) == [300, 301, 302, 303, 304]
    # Step 305 was taken, and the history restarted from the flagged run plus step 305.
    assert np.array_equal(guard.state_dict()["grad_norm"], grad_norm[300:306])
    assert run(guard, loss, grad_norm, start=306) == [450, 451, 452]
    assert np.array_equal(guard.state_dict()["grad_norm"], grad_norm[550:600])


def test_a_spike_run_in_progress_survives_a_resume():
    loss, grad_norm = clean_series(400, seed=6)
    grad_norm[300:] *= 10
    reference = SpikeGuard(max_consecutive=5)
    reference_flags = run(reference, loss, grad_norm)
    first = SpikeGuard(max_consecutive=5)
    assert run(first, loss[:303], grad_norm[:303]) == [300, 301, 302]
    resumed = SpikeGuard(max_consecutive=5)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert run(resumed, loss, grad_norm, start=303) == [303, 304]
    assert reference_flags == [300, 301, 302, 303, 304]
    assert resumed.state_dict() == reference.state_dict()


def test_load_state_dict_rejects_other_window():
    guard = SpikeGuard(window=50)
    with pytest.raises(ValueError, match="window 30"):
        guard.load_state_dict(SpikeGuard(window=30, min_history=20).state_dict())


def entropy_ratios(teacher_logits: torch.Tensor, temperature: float) -> list[float]:
    """Per step, H(softmax(logits / T)) / ln K averaged over the batch; logits are (steps, B, K)."""
    p = torch.softmax(teacher_logits.double() / temperature, dim=-1)
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return (h.mean(-1) / math.log(teacher_logits.shape[-1])).tolist()


def test_uniform_teacher_raises_after_window():
    detector = CollapseDetector(ratio_threshold=0.95, window_steps=20)
    # Near-uniform teacher: tiny logits at temperature 1.0.
    ratios = entropy_ratios(1e-3 * torch.randn(100, 16, 256, generator=torch.Generator().manual_seed(0)), 1.0)
    assert min(ratios) > 0.999
    raised_at = None
    for step, ratio in enumerate(ratios):
        try:
            detector.update(ratio, step=step)
        except CollapseError as err:
            raised_at, message = step, str(err)
            break
    assert raised_at == 19
    assert "steps 0..19" in message
    for hint in ("near uniform", "teacher temperature", "centering momentum", "BatchNorm", "learning rate"):
        assert hint in message


def test_healthy_teacher_never_raises():
    detector = CollapseDetector()
    ratios = entropy_ratios(torch.randn(500, 16, 256, generator=torch.Generator().manual_seed(1)), 0.04)
    assert max(ratios) < 0.5
    for step, ratio in enumerate(ratios):
        detector.update(ratio, step=step)
    assert detector.consecutive == 0


def test_interrupted_streak_resets():
    detector = CollapseDetector(ratio_threshold=0.95, window_steps=20)
    for step in range(19):
        detector.update(0.99, step=step)
    detector.update(0.90, step=19)
    for step in range(20, 39):
        detector.update(0.99, step=step)
    assert detector.consecutive == 19
    with pytest.raises(CollapseError, match=r"steps 20\.\.39"):
        detector.update(0.99, step=39)


def test_collapse_state_dict_round_trip():
    first = CollapseDetector(window_steps=20)
    for step in range(10):
        first.update(1.0, step=step)
    resumed = CollapseDetector(window_steps=20)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for step in range(10, 19):
        resumed.update(1.0, step=step)
    with pytest.raises(CollapseError, match=r"steps 0\.\.19"):
        resumed.update(1.0, step=19)
