"""The peer watchdog (disco_jax/distributed.py): a dead or silent process is named at once.

Unit level, over socket pairs standing in for the rendezvous connections, so every branch runs
in milliseconds; tests/test_multihost.py kills a real process of a 2-process run.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from disco_jax import distributed

_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def close_sockets():
    yield
    while _OPEN:
        _OPEN.pop().close()


def make_watch(pid: int, count: int, peers: list[int], timeout_s: float = 30.0):
    """A PeerWatch for process `pid`, plus the far ends of its connections and an exit record."""
    ours, theirs = {}, {}
    for k in peers:
        a, b = socket.socketpair()
        ours[k], theirs[k] = a, b
        _OPEN.extend((a, b))
    exits: list[int] = []
    done = threading.Event()

    def exit_fn(code: int) -> None:
        exits.append(code)
        done.set()  # the watchdog thread then leaves its loop (os._exit would end the process)

    watch = distributed.PeerWatch(ours, pid, count, timeout_s, exit_fn=exit_fn)
    return watch, theirs, exits, done


def read_lines(sock: socket.socket, until: str, timeout_s: float = 5.0) -> list[str]:
    sock.settimeout(timeout_s)
    buf = b""
    deadline = time.monotonic() + timeout_s
    while until.encode() not in buf and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode().splitlines()


def test_a_killed_peer_is_named_at_once(capsys):
    distributed.note_step(17)
    watch, theirs, exits, done = make_watch(0, 3, [1, 2])
    watch.start()
    t0 = time.monotonic()
    theirs[2].close()  # what the kernel does to the sockets of a SIGKILLed process
    assert done.wait(5.0)
    assert time.monotonic() - t0 < 5.0
    assert exits == [distributed.EXIT_PEER_LOST]
    err = capsys.readouterr().err
    assert "error: process 2 of 3 exited or was killed" in err
    assert "near step 17" in err and "start all 3 processes again" in err
    # Process 0 told the survivor whom to name before stopping.
    lines = read_lines(theirs[1], "gone")
    assert any(line.startswith("gone 2 exited or was killed") for line in lines), lines


def test_the_relay_from_process_0_names_the_same_process(capsys):
    watch, theirs, exits, done = make_watch(1, 3, [0])
    watch.start()
    theirs[0].sendall(b"hb\ngone 2 exited or was killed (its connection closed)\n")
    assert done.wait(5.0)
    assert exits == [distributed.EXIT_PEER_LOST]
    err = capsys.readouterr().err
    assert "error: process 2 of 3 exited or was killed" in err
    assert "process 0" not in err.split(";")[0]  # not blamed on the messenger


def test_a_silent_peer_is_named_after_the_timeout(capsys):
    watch, theirs, exits, done = make_watch(0, 2, [1], timeout_s=0.6)
    watch.start()
    t0 = time.monotonic()
    assert done.wait(10.0)  # nothing arrives from process 1: no heartbeat, no close
    assert 0.6 <= time.monotonic() - t0 < 10.0
    assert "error: process 1 of 2 stopped responding" in capsys.readouterr().err


def test_heartbeats_keep_a_slow_peer_alive():
    watch, theirs, exits, done = make_watch(0, 2, [1], timeout_s=0.6)
    watch.start()
    for _ in range(12):  # 1.2 s in all, twice the timeout, with a heartbeat every 0.1 s
        theirs[1].sendall(b"hb\n")
        time.sleep(0.1)
    assert not done.is_set() and exits == []
    # And our side sends heartbeats too (what keeps the peer's watchdog quiet).
    assert "hb" in read_lines(theirs[1], "hb")
    watch.finish()


@pytest.mark.parametrize("last", ["done", "failed"])
def test_a_peer_that_says_why_it_ends_is_not_called_lost(last):
    watch, theirs, exits, done = make_watch(0, 2, [1])
    watch.start()
    theirs[1].sendall(f"{last}\n".encode())
    theirs[1].close()
    time.sleep(0.5)
    assert exits == [] and not done.is_set()
    watch.finish()
    assert not watch.thread.is_alive() or watch.thread.join(2.0) is None
    assert not watch.thread.is_alive()


def test_finish_tells_the_peers():
    watch, theirs, exits, done = make_watch(0, 3, [1, 2])
    watch.start()
    watch.finish(ok=True)
    for k in (1, 2):
        assert "done" in read_lines(theirs[k], "done")
    assert exits == []
