"""SFT sub-phase rules at their boundaries, online use on prefixes, and the loss/ceiling correlation."""

import numpy as np
import pytest

from engine.analysis import (
    best_a_post,
    ceiling_correlation,
    classify_subphases,
    current_subphase,
    subphase_spans,
)
from engine.analysis.phases import subphase_reached

# L_min = 1.0 below, so the bars are Stable <= 1.02, Mild < 1.10, Severe >= 1.10.


def test_canonical_series():
    losses = [2.0, 1.5, 1.1, 1.0, 1.01, 1.05, 1.2]
    assert classify_subphases(losses) == ["Adaptive", "Adaptive", "Adaptive", "Stable", "Stable", "Mild", "Severe"]


@pytest.mark.parametrize(
    "last, phase",
    [
        (1.02, "Stable"),  # exactly (1 + d1) L_min is Stable
        (1.0201, "Mild"),  # just above the Stable bar
        (1.0999, "Mild"),  # just below the Severe bar
        (1.10, "Severe"),  # exactly (1 + d2) L_min is Severe
        (1.5, "Severe"),
    ],
)
def test_boundaries_after_the_minimum(last, phase):
    assert classify_subphases([1.3, 1.0, last])[-1] == phase


def test_boundaries_before_the_minimum():
    # Points before the first Stable point are Adaptive whatever their level.
    assert classify_subphases([1.0201, 1.0]) == ["Adaptive", "Stable"]
    assert classify_subphases([1.02, 1.0]) == ["Stable", "Stable"]


def test_bump_between_stable_points_stays_stable():
    assert classify_subphases([1.5, 1.0, 1.08, 1.01, 1.2]) == ["Adaptive", "Stable", "Stable", "Stable", "Severe"]


def test_custom_deltas():
    assert classify_subphases([1.0, 1.04, 1.06], d1=0.05, d2=0.06) == ["Stable", "Stable", "Severe"]


def test_online_use_on_prefixes():
    losses = [2.0, 1.5, 1.1, 1.0, 1.01, 1.05, 1.2]
    online = [current_subphase(losses[: i + 1]) for i in range(len(losses))]
    # Each new minimum is Stable when it arrives; degradation shows up once the minimum is behind us.
    assert online == ["Stable", "Stable", "Stable", "Stable", "Stable", "Mild", "Severe"]


def test_spans():
    spans = subphase_spans([2.0, 1.5, 1.0, 1.01, 1.05, 1.2, 1.3])
    assert [(s.phase, s.start, s.end) for s in spans] == [
        ("Adaptive", 0, 1), ("Stable", 2, 3), ("Mild", 4, 4), ("Severe", 5, 6)]


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [1.0, 0.0], [[1.0, 2.0]]])
def test_bad_losses_raise(bad):
    with pytest.raises(ValueError):
        classify_subphases(bad)


def test_bad_deltas_raise():
    with pytest.raises(ValueError, match="d1 < d2"):
        classify_subphases([1.0], d1=0.1, d2=0.05)


def test_correlation_on_synthetic_pairs():
    rng = np.random.default_rng(0)
    loss = np.linspace(0.3, 0.6, 8)
    a_post = 90 - 40 * loss + rng.normal(0, 0.3, 8)
    c = ceiling_correlation(list(zip(loss, a_post)))
    assert c.n == 8 and c.r < -0.98 and c.p_value < 1e-4
    assert ceiling_correlation([(0.1, 1), (0.2, 2), (0.3, 3)]).r == pytest.approx(1.0)


@pytest.mark.parametrize("pairs", [[(0.1, 1), (0.2, 2)], [(0.1, 1), (0.1, 2), (0.1, 3)], [(0.1, 1), (0.2, float("nan")), (0.3, 2)]])
def test_correlation_rejects_undefined_input(pairs):
    with pytest.raises(ValueError):
        ceiling_correlation(pairs)


def test_best_a_post():
    class R:
        def __init__(self, v):
            self.A_post = v

    assert best_a_post([R(80.0), R(float("nan")), R(83.5)]) == 83.5
    with pytest.raises(ValueError):
        best_a_post([])


def test_subphase_reached_needs_patience_validations_at_or_past_the_target():
    rising = [2.0, 1.0, 1.05, 1.12, 1.15]
    assert subphase_reached(rising[:4], "Severe") is None  # one Severe validation: a spike is not over-fitting
    reason = subphase_reached(rising, "Severe")
    assert reason.startswith("Severe sub-phase reached for 2") and "1.150 x the minimum 1.0000" in reason
    assert subphase_reached(rising[:4], "Mild") is not None  # Mild then Severe: both count as past Mild
    assert subphase_reached(rising[:4], "Severe", patience=1) is not None
    assert subphase_reached([2.0, 1.0, 1.12, 0.9, 1.0], "Severe") is None  # a new minimum relabels the past
    with pytest.raises(ValueError, match="until must be"):
        subphase_reached(rising, "Stable")


def test_a_window_reads_the_mean_of_neighbouring_validations():
    from engine.analysis.phases import smooth_losses, smoothed_min

    jitter = [2.0, 1.2, 1.0, 1.2, 1.2]  # a lone low point, then the loss back at its level
    assert subphase_reached(jitter, "Severe") is not None  # raw: 2 validations 20% above the dip
    assert subphase_reached(jitter, "Severe", window=3) is None  # means of 3: no over-fitting
    assert classify_subphases(jitter, window=3)[-1] == "Mild"
    rising = jitter + [1.4, 1.6, 1.8]  # a sustained rise is Severe either way
    assert classify_subphases(rising, window=3)[-2:] == ["Severe", "Severe"]
    assert smooth_losses([1.0, 2.0, 3.0, 4.0], 3).tolist() == [1.5, 2.0, 3.0, 3.5]  # centered, fewer at the ends
    assert smooth_losses([1.0, 2.0, 3.0, 4.0], 3, centered=False).tolist() == [1.0, 1.5, 2.0, 3.0]  # trailing
    assert smoothed_min([3.0, 1.0, 3.0, 1.6, 1.6, 1.6, 2.0], 3) == (4, pytest.approx(1.6))  # not the lone dip
    reason = subphase_reached(rising, "Severe", window=3)
    assert reason and "mean of the last 3" in reason


def test_a_window_spans_training_steps_so_dense_replayed_points_do_not_shrink_it():
    from types import SimpleNamespace

    from engine.analysis.phases import history_subphases, smooth_losses

    grid = [(10, 2.0), (20, 1.0), (30, 1.2), (40, 1.3)]
    dense = grid[:2] + [(21, 1.0), (22, 1.0), (23, 1.06)] + grid[2:]
    steps, losses = zip(*dense)
    by_count = smooth_losses(losses, 3)
    by_steps = smooth_losses(losses, 3, steps=steps, spacing=10)
    assert by_steps[-1] == pytest.approx((1.2 + 1.3) / 2)  # step 40: the validations within 30-50
    assert by_steps[1] == pytest.approx((2.0 + 1.0 + 1.0 + 1.0 + 1.06 + 1.2) / 6)  # step 20: those within 10-30
    assert by_count[1] == pytest.approx((2.0 + 1.0 + 1.0) / 3)  # by position: only the neighbours
    sft = SimpleNamespace(subphase_d1=0.02, subphase_d2=0.10, subphase_window=3, val_every=10)
    history = [{"step": s, "val_loss": v} for s, v in dense]
    assert history_subphases(history, sft) == classify_subphases(losses, 0.02, 0.10, 3, steps=steps, spacing=10)
    regular = [{"step": s, "val_loss": v} for s, v in grid]
    assert history_subphases(regular, sft) == classify_subphases([v for _, v in grid], window=3)  # a grid: the same
