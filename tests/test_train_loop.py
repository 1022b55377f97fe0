"""The loop's resources are closed on every way out of `train.run`: a non-finite stop, an error
in an action, a preemption. Tiny runs (tests/robust_util.tiny_config) stopped at step 1 or 2."""

from __future__ import annotations

import contextlib
import logging
import signal

import orbax.checkpoint as ocp
import pytest

from disco_jax import train
from tests import signal_run
from tests.robust_util import make_teacher, tiny_config


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("teachers")
    return (make_teacher(str(root / "good"), data_dir),
            make_teacher(str(root / "nan"), data_dir, nan=True))


@pytest.fixture
def tracked(monkeypatch):
    """(opened, closed): every orbax CheckpointManager and MetricsLog created, and those whose
    own close() ran to its end, in order."""
    from disco_jax import run_log

    opened, closed = [], []
    for cls in (ocp.CheckpointManager, run_log.MetricsLog):
        def init(self, *args, _init=cls.__init__, **kwargs):
            _init(self, *args, **kwargs)
            opened.append(self)

        def close(self, _close=cls.close):
            _close(self)
            closed.append(self)

        monkeypatch.setattr(cls, "__init__", init)
        monkeypatch.setattr(cls, "close", close)
    return opened, closed


def boom(step, state):
    del state
    if step == 1:
        raise RuntimeError("boom at step 1")


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["nonfinite", "error", "preempted"])
def test_every_ending_closes_the_writers_and_the_checkpoint_manager(tmp_path, data_dir, teachers,
                                                                    tracked, ending):
    from disco_jax import run_log

    opened, closed = tracked
    handler = signal.getsignal(signal.SIGTERM)
    workdir = str(tmp_path / "w")
    if ending == "nonfinite":  # the poisoned teacher: step 1 is non-finite, seen at step 2
        with pytest.raises(FloatingPointError, match=r"at step 1 \("):
            train.run(tiny_config(data_dir, teachers[1]), workdir)
    elif ending == "error":
        with pytest.raises(RuntimeError, match="boom at step 1"):
            train.run(tiny_config(data_dir, teachers[0]), workdir, extra_actions=(boom,))
    else:
        res = train.run(tiny_config(data_dir, teachers[0]), workdir,
                        extra_actions=(signal_run.signal_at(1, int(signal.SIGTERM)),))
        assert res["preempted"] and res["step"] == 1
    assert [type(x) for x in opened] == [ocp.CheckpointManager, run_log.MetricsLog]
    # Each closed once, the writers first (the reverse of their opening).
    assert [id(x) for x in closed] == [id(x) for x in opened[::-1]]
    assert signal.getsignal(signal.SIGTERM) == handler


def test_a_failing_close_never_hides_the_error_in_flight(caplog):
    def bad_close():
        raise OSError("close failed")

    with caplog.at_level(logging.WARNING, logger="disco_jax"):
        with pytest.raises(FloatingPointError, match="non-finite"):
            with contextlib.ExitStack() as stack:
                train.close_at_exit(stack, bad_close, "the checkpoint manager")
                raise FloatingPointError("non-finite")
    assert "closing the checkpoint manager failed too: close failed" in caplog.text
    with pytest.raises(OSError, match="close failed"):  # on the normal path it is the error
        with contextlib.ExitStack() as stack:
            train.close_at_exit(stack, bad_close, "the checkpoint manager")
