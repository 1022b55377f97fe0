"""The one vocabulary for "when" (steps, epochs, fractions) and the one source of rate / ETA."""

import pytest

from disco_jax import run_log, when
from disco_jax.errors import ConfigError


def test_durations_in_steps_epochs_or_fractions():
    kw = {"steps_per_epoch": 11, "total_steps": 550}
    assert when.to_steps({"every_steps": 20}, "every", **kw) == 20
    assert when.to_steps({"every_epochs": 10.0}, "every", **kw) == 110
    assert when.to_steps({"every_epochs": 0.5}, "every", **kw) == 6  # rounded up, >= 1 step
    assert when.to_steps({"every_fraction": 0.1}, "every", **kw) == 55
    assert when.to_steps({"every_steps": -1, "every_epochs": -1.0}, "every", **kw) == -1
    with pytest.raises(ConfigError, match="set one of every_steps, every_epochs"):
        when.to_steps({"every_steps": 5, "every_epochs": 1.0}, "every", **kw)
    with pytest.raises(ConfigError, match=r"every_fraction must be in \(0, 1\]"):
        when.to_steps({"every_fraction": 2.0}, "every", **kw)


def test_itstime():
    assert [s for s in range(1, 11) if when.itstime(s, 4, 10)] == [4, 8]
    assert [s for s in range(1, 11) if when.itstime(s, 4, 10, last=True)] == [4, 8, 10]
    assert not any(when.itstime(s, -1, 10, last=True) for s in range(1, 11))


def test_progress_rate_leaves_out_evaluation_time():
    progress = run_log.Progress(num_train_steps=100, every_steps=10)
    t = 1000.0
    for step in range(1, 21):
        t += 0.5  # 2 steps/s of training
        if step == 15:  # a 30 s evaluation in `timed("eval")`
            progress._time_per_part["eval"] += 30.0
            t += 30.0
        progress(step, t)
    assert progress.steps_per_sec == pytest.approx(2.0)
    assert progress.eta_seconds == pytest.approx(80 / 2.0)
