"""disco_jax/distributed.py at unit level: where the settings come from, cluster detection, and
the peer watchdog (a dead or silent process is named at once).

The watchdog runs over socket pairs standing in for the rendezvous connections, so every branch
runs in milliseconds; tests/test_multihost.py starts real processes and kills one.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from disco_jax import distributed
from disco_jax.errors import ConfigError

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
    # t0 before the watchdog exists: its clock starts when it is built or started, so a t0
    # taken after that made the measured wait a hair shorter than the timeout (0.59994 s).
    t0 = time.monotonic()
    watch, theirs, exits, done = make_watch(0, 2, [1], timeout_s=0.6)
    watch.start()
    assert done.wait(10.0)  # nothing arrives from process 1: no heartbeat, no close
    assert 0.6 <= time.monotonic() - t0 < 10.0
    assert "error: process 1 of 2 stopped responding" in capsys.readouterr().err


def test_an_error_in_a_collective_waits_for_the_watchdog_to_name_the_peer(capsys, monkeypatch):
    """The race CI met: the all-reduce fails in the main thread ("connection reset by peer") a
    moment before the watchdog reads the closed socket. `explain_failure` (main.py's handler of
    an unexpected error) waits for the watchdog, so the peer is named, not the gloo error."""
    watch, theirs, exits, done = make_watch(1, 2, [0])
    watch.start()
    monkeypatch.setattr(distributed, "_watch", watch)
    threading.Timer(0.3, theirs[0].close).start()  # the death, noticed only after the error
    t0 = time.monotonic()
    distributed.explain_failure(grace_s=10.0)
    assert exits == [distributed.EXIT_PEER_LOST] and time.monotonic() - t0 < 5.0
    assert "error: process 0 of 2 exited or was killed" in capsys.readouterr().err
    assert distributed._watch is None


def test_an_error_of_our_own_is_not_delayed_past_the_grace(capsys, monkeypatch):
    watch, theirs, exits, done = make_watch(1, 2, [0])
    watch.start()
    monkeypatch.setattr(distributed, "_watch", watch)
    t0 = time.monotonic()
    distributed.explain_failure(grace_s=0.3)  # no peer is lost: the error is this process's
    assert exits == [] and 0.3 <= time.monotonic() - t0 < 5.0
    assert read_lines(theirs[0], "failed")[-1] == "failed"  # peers are told, not left guessing


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


# ------------------------------------------------------------------ settings and detection

CLUSTER_ENV = ("DISCO_COORDINATOR_ADDRESS", "DISCO_NUM_PROCESSES", "DISCO_PROCESS_ID",
               "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NPROCS", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def clean_env(monkeypatch):
    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_from_flags_then_environment(clean_env):
    assert distributed.settings() is None
    assert distributed.settings("h:1", 4, 3) == {"address": "h:1", "count": 4, "id": 3}
    clean_env.setenv("DISCO_COORDINATOR_ADDRESS", "env:2")
    clean_env.setenv("DISCO_NUM_PROCESSES", "2")
    clean_env.setenv("DISCO_PROCESS_ID", "1")
    assert distributed.settings() == {"address": "env:2", "count": 2, "id": 1}
    assert distributed.settings("flag:3", -1, 0) == {"address": "flag:3", "count": 2, "id": 0}


@pytest.mark.parametrize("args, message", [
    (("h:1", None, 0), "need all of --coordinator_address, --num_processes and --process_id"),
    (("h:1", 2, 2), r"process_id 2 must be in \[0, num_processes=2\)"),
    (("h:1", 0, 0), r"process_id 0 must be in \[0, num_processes=0\)"),
    (("host", 2, 0), "coordinator_address 'host' must be HOST:PORT"),
])
def test_bad_settings_are_one_line(clean_env, args, message):
    with pytest.raises(ConfigError, match=message):
        distributed.settings(*args)


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, True),
    ({"SLURM_NTASKS": "16"}, False),  # not inside a job (e.g. a login node's leftover variable)
    ({"TPU_WORKER_HOSTNAMES": "t0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, True),
])
def test_cluster_detection(clean_env, env, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert distributed.auto_detected() is expected


@pytest.mark.parametrize("mode, env, starts", [
    ("auto", {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, True),
    ("auto", {}, False),
    ("on", {}, True),
    ("off", {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, False),
])
def test_initialize_starts_jax_distributed_only_when_asked(clean_env, mode, env, starts):
    for name, value in env.items():
        clean_env.setenv(name, value)
    calls = []
    clean_env.setattr(distributed.jax.distributed, "initialize",
                      lambda *a, **kw: calls.append(kw))
    clean_env.setattr(distributed, "_watch_detected", lambda timeout_s: None)
    distributed.initialize(timeout_s=42, mode=mode)
    assert calls == ([{"initialization_timeout": 42, "heartbeat_timeout_seconds": 42}]
                     if starts else [])


def test_initialize_refuses_an_unknown_mode(clean_env):
    with pytest.raises(ConfigError, match="--distributed must be auto, on or off, got 'yes'"):
        distributed.initialize(mode="yes")


def test_rendezvous_then_watch_over_tcp_with_three_processes(capsys):
    """Real localhost sockets: 3 rendezvous (threads), then process 2 vanishes; 0 and 1 name it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1] - 1  # the rendezvous listens on PORT+1
    address = f"127.0.0.1:{port}"
    conns: dict[int, dict] = {}

    def join(pid: int) -> None:
        conns[pid] = distributed.rendezvous(address, 3, pid, timeout_s=20)

    threads = [threading.Thread(target=join, args=(i,)) for i in (0, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(conns[0]) == [1, 2] and list(conns[1]) == [0] and list(conns[2]) == [0]
    for c in (*conns[0].values(), *conns[1].values(), *conns[2].values()):
        _OPEN.append(c)
    events = {i: threading.Event() for i in (0, 1)}
    exits: dict[int, int] = {}

    def exit_for(pid):
        def exit_fn(code):
            exits[pid] = code
            events[pid].set()
        return exit_fn

    watches = [distributed.PeerWatch(conns[i], i, 3, 30.0, exit_fn=exit_for(i)).start()
               for i in (0, 1)]
    conns[2][0].close()  # process 2 dies
    assert events[0].wait(5) and events[1].wait(5)
    assert exits == {0: distributed.EXIT_PEER_LOST, 1: distributed.EXIT_PEER_LOST}
    err = capsys.readouterr().err
    assert "error: process 2 of 3 exited or was killed" in err
    assert "stopping process 0 too" in err and "stopping process 1 too" in err
    assert "process 0 of 3" not in err  # process 1 was told who died; it does not blame 0
    del watches
