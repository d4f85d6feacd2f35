"""The few-shot schedule (nnunet_fseft/training/schedule.py): length from K, warm-up then cosine, and the
early stop on the training loss (end to end: test_e2e.py)."""
import math

import pytest
import torch

from nnunet_fseft.training.schedule import WarmupCosine, few_shot_schedule, plateaued, warmup_cosine

FSEFT = dict(max_passes=200, patches_per_scan=6, warmup_passes=1, plateau_window=10, plateau_patience=20)


def test_the_length_follows_the_support_set():
    one, five = (few_shot_schedule(k, 2, 25, **FSEFT) for k in (1, 5))
    assert (one.steps_per_pass, five.steps_per_pass) == (3, 15)  # 6 patches per scan, 2 per batch
    assert one.total_steps >= 200 * 3 and five.total_steps >= 200 * 15  # 200 passes, in whole epochs
    assert five.total_steps == 5 * one.total_steps
    assert (one.warmup_steps, five.warmup_steps) == (3, 15)  # one pass
    assert five.patience == math.ceil(20 * 15 / 25) and one.patience == math.ceil(20 * 3 / 25)
    assert few_shot_schedule(5, 4, 25, **FSEFT).steps_per_pass == 8  # a larger batch: fewer steps per pass


def test_a_fixed_length_wins_and_the_early_stop_keeps_a_minimum():
    s = few_shot_schedule(1, 2, 3, **FSEFT, epochs=2)
    assert (s.epochs, s.total_steps) == (2, 6)
    assert s.warmup_steps == 3 and s.window >= 1 and s.patience >= 2
    tiny = few_shot_schedule(1, 2, 1000, **{**FSEFT, "plateau_window": 1, "plateau_patience": 1})
    assert (tiny.window, tiny.patience) == (1, 2)


def test_the_learning_rate_warms_up_then_decays_to_zero():
    lrs = [warmup_cosine(i, 100, 10, 0.01) for i in range(101)]
    assert 0 < lrs[0] < lrs[5] < lrs[9] == pytest.approx(0.01)  # the first step already moves
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[55] == pytest.approx(0.005) and lrs[100] == pytest.approx(0, abs=1e-12)


def test_the_scheduler_sets_every_step_and_nnunets_epoch_call_agrees():
    schedule = few_shot_schedule(1, 2, 25, **FSEFT)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    scheduler = WarmupCosine(optimizer, 1e-2, schedule)
    scheduler.step(3)  # what nnU-Net calls at the start of epoch 3
    at_epoch = optimizer.param_groups[0]["lr"]
    scheduler.at_step(75)
    assert optimizer.param_groups[0]["lr"] == at_epoch == warmup_cosine(75, schedule.total_steps, 3, 1e-2)
    scheduler.at_step(76)
    assert optimizer.param_groups[0]["lr"] < at_epoch


def test_the_early_stop_waits_for_a_plateau_of_the_moving_average():
    falling = [1 / (1 + i) for i in range(40)]
    assert not plateaued(falling, window=3, patience=5, delta=1e-3)
    flat = falling[:10] + [falling[9]] * 6
    assert not plateaued(flat[:-1], window=3, patience=5, delta=1e-3)  # the average still fell 5 epochs ago
    assert plateaued(flat + [falling[9]] * 2, window=3, patience=5, delta=1e-3)
    noisy = [1.0 - 0.01 * i + (0.05 if i % 2 else -0.05) for i in range(30)]  # noisy, and still improving
    assert not plateaued(noisy, window=4, patience=6, delta=1e-3)
    assert not plateaued([0.5] * 5, window=3, patience=5, delta=1e-3)  # too short to tell
    assert plateaued([0.5] * 5 + [float("nan")] * 6, window=2, patience=5, delta=1e-3)  # NaN is no gain
