"""Multi-process start-up: `jax.distributed` from flags, environment, TPU pods or SLURM.

One process per host (TPU VM worker, SLURM task, or a local process per GPU group). Each
process reads only its shard of the data (`data.train_dataset(process_index=...)`), the global
batch is assembled with `jax.make_array_from_process_local_data`, process 0 alone writes logs
and metrics, and orbax checkpoints are written by every process (each writes its shards).

Where the settings come from, first match wins:
1. flags `--coordinator_address HOST:PORT --num_processes N --process_id I`;
2. environment `DISCO_COORDINATOR_ADDRESS`, `DISCO_NUM_PROCESSES`, `DISCO_PROCESS_ID`;
3. `--distributed=on`: jax's own cluster detection (TPU VM pods, SLURM, Open MPI, k8s);
   launch/tpu_pod.sh passes it;
4. `--distributed=auto` (default): the same, when the environment shows several processes
   (a SLURM job with several tasks, or several TPU_WORKER_HOSTNAMES);
5. otherwise (or `--distributed=off`) a single process: nothing to initialise.

`jax.distributed.initialize` aborts the process without saying who is missing when a peer never
arrives. So explicit starts first meet at a small TCP rendezvous on PORT+1: after `timeout_s`
process 0 names the processes that never arrived and every process exits with that one line.
The rendezvous connections then stay open for the whole run as a watchdog (`PeerWatch`): a
process that dies later (killed, crashed, its host gone) closes its connection, or stops sending
heartbeats for `timeout_s`, and every other process prints one line naming it and exits with
status 4 at once, instead of hanging in a collective that will never complete. The last complete
checkpoint is untouched (a checkpoint is only "latest" once every process finished writing it),
so restarting all processes resumes. A process that finishes, is preempted, or stops on its own
error says so first (`finish`), so the others do not mistake its exit for a death.

jax's own heartbeat alone (measured by launch/probe_peer_loss.py, figures in launch/README.md)
ends a survivor only after the heartbeat timeout when a worker is killed, and then by SIGABRT
with a C++ stack trace; the watchdog is kept for what that lacks: noticing a killed process at
once, one line naming it on every survivor, and exit status 4.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
import time

import jax

from disco_jax.errors import EXIT_RUN_FAILED, ConfigError, RunError

log = logging.getLogger("disco_jax")


class DistributedError(RunError):
    """A process never arrived or the coordinator is unreachable (exit status 4, as a peer
    lost mid-run: the input was fine, the cluster was not)."""


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> dict | None:
    """The explicit (address, count, id) from flags, else the environment; None if unset."""
    env = os.environ
    address = coordinator_address or env.get("DISCO_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes not in (None, -1) else env.get("DISCO_NUM_PROCESSES")
    pid = process_id if process_id not in (None, -1) else env.get("DISCO_PROCESS_ID")
    if address is None and count is None and pid is None:
        return None
    if address is None or count is None or pid is None:
        raise ConfigError("multi-process runs need all of --coordinator_address, --num_processes"
                          " and --process_id (or DISCO_COORDINATOR_ADDRESS/NUM_PROCESSES/"
                          "PROCESS_ID)")
    count, pid = int(count), int(pid)
    if count < 1 or not 0 <= pid < count:
        raise ConfigError(f"process_id {pid} must be in [0, num_processes={count})")
    if ":" not in address:
        raise ConfigError(f"coordinator_address {address!r} must be HOST:PORT")
    return {"address": address, "count": count, "id": pid}


def auto_detected() -> bool:
    """True on a multi-worker TPU pod or in a SLURM job with several tasks."""
    env = os.environ
    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    slurm_tasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1)
    return len(tpu_hosts) > 1 or ("SLURM_JOB_ID" in env and slurm_tasks > 1)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300, mode: str = "auto") -> None:
    """Start jax.distributed if this is a multi-process run; must precede any jax computation."""
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"--distributed must be auto, on or off, got {mode!r}")
    if mode == "off":
        return
    explicit = settings(coordinator_address, num_processes, process_id)
    if explicit is None:
        if mode == "on" or auto_detected():
            jax.distributed.initialize(initialization_timeout=timeout_s,
                                       heartbeat_timeout_seconds=timeout_s)
            log.info("jax.distributed (auto): process %d of %d", jax.process_index(),
                     jax.process_count())
            _watch_detected(timeout_s)
        return
    if explicit["count"] == 1:
        return
    # CPU devices need a collectives backend across processes (GPUs/TPUs ignore this setting).
    # Do not ask jax.default_backend() here: it would start the backends too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    conns = rendezvous(explicit["address"], explicit["count"], explicit["id"], timeout_s)
    jax.distributed.initialize(explicit["address"], num_processes=explicit["count"],
                               process_id=explicit["id"], initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=timeout_s)
    log.info("jax.distributed: process %d of %d, coordinator %s", jax.process_index(),
             jax.process_count(), explicit["address"])
    watch(conns, explicit["id"], explicit["count"], timeout_s)


def _watch_detected(timeout_s: float) -> None:
    """The watchdog for a detected cluster, on the coordinator's PORT+1 (best effort)."""
    if jax.process_count() == 1:
        return
    try:  # jax keeps the detected coordinator address in its (private) global state
        from jax._src import distributed as jax_distributed

        address = jax_distributed.global_state.coordinator_address
        conns = rendezvous(address, jax.process_count(), jax.process_index(), timeout_s)
    except (AttributeError, ImportError, OSError, TypeError, ValueError) as e:
        log.warning("no peer watchdog (%s): a dead process is only noticed by jax's heartbeat"
                    " after %g s", e, timeout_s)
        return
    watch(conns, jax.process_index(), jax.process_count(), timeout_s)


def _rendezvous_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port) + 1


def rendezvous(address: str, count: int, pid: int, timeout_s: float) -> dict[int, socket.socket]:
    """Every process checks in with process 0 on PORT+1, or all fail naming who is missing.

    Returns the open connections, by peer id: process 0 holds one to every other process, the
    others one to process 0. `PeerWatch` keeps them for the run.
    """
    host, port = _rendezvous_address(address)
    deadline = time.monotonic() + timeout_s
    if pid == 0:
        return _serve(port, count, deadline, address, timeout_s)
    return {0: _join(host, port, pid, deadline, address, timeout_s)}


def _serve(port: int, count: int, deadline: float, address: str,
           timeout_s: float) -> dict[int, socket.socket]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("", port))
    server.listen(count)
    arrived: dict[int, socket.socket] = {}
    try:
        while len(arrived) < count - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            server.settimeout(left)
            try:
                conn, _ = server.accept()
            except TimeoutError:
                break
            conn.settimeout(max(deadline - time.monotonic(), 1.0))
            try:
                arrived[int(conn.recv(64).decode().strip())] = conn
            except (OSError, ValueError):
                conn.close()
        missing = sorted(set(range(1, count)) - set(arrived))
        reply = ("ok" if not missing else "missing " + ",".join(map(str, missing))) + "\n"
        for conn in arrived.values():
            try:
                conn.sendall(reply.encode())
            except OSError:
                pass
            if missing:
                conn.close()
    finally:
        server.close()
    if missing:
        raise DistributedError(_missing_message(missing, count, address, timeout_s))
    return arrived


def _join(host: str, port: int, pid: int, deadline: float, address: str,
          timeout_s: float) -> socket.socket:
    reply, conn = "", None
    while time.monotonic() < deadline:
        try:
            conn = socket.create_connection((host, port), timeout=2.0)
            conn.sendall(f"{pid}\n".encode())
            conn.settimeout(max(deadline - time.monotonic(), 1.0) + 5.0)
            reply = _read_line(conn)
            break
        except OSError:  # not listening yet (refused) or slow: retry until the deadline
            if conn is not None:
                conn.close()
                conn = None
            time.sleep(0.2)
    if reply == "ok" and conn is not None:
        return conn
    if conn is not None:
        conn.close()
    if reply.startswith("missing "):
        missing = [int(x) for x in reply.split()[1].split(",")]
        raise DistributedError(_missing_message(missing, None, address, timeout_s))
    raise DistributedError(
        f"process {pid}: the coordinator (process 0) at {address} did not answer within"
        f" {timeout_s:g} s; start process 0 with the same --coordinator_address, or raise"
        " --distributed_timeout"
    )


def _read_line(conn: socket.socket) -> str:
    """One line, byte by byte: what follows it (heartbeats) stays for `PeerWatch`."""
    out = b""
    while not out.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            break
        out += byte
    return out.decode().strip()


def _missing_message(missing: list[int], count: int | None, address: str,
                     timeout_s: float) -> str:
    of = f" of {count}" if count else ""
    return (
        f"process(es) {', '.join(map(str, missing))}{of} never arrived at the coordinator"
        f" {address} within {timeout_s:g} s; start every process with the same"
        " --coordinator_address and --num_processes, or raise --distributed_timeout"
    )


# --- after start-up: a watchdog over the rendezvous connections -------------------------------

_progress: dict[str, int | None] = {"step": None}
_watch: PeerWatch | None = None
EXIT_PEER_LOST = EXIT_RUN_FAILED


def note_step(step: int) -> None:
    """The training loop's step, for the message if a peer is lost (host-side, free)."""
    _progress["step"] = step


class PeerWatch:
    """Names a peer process that dies or hangs after start-up, and stops this one.

    One daemon thread per process: it sends "hb" every `timeout_s / 8` (at most 5 s) on each
    connection and reads the peers' lines. End of stream or a reset without a "done"/"failed"
    line first means the peer process is gone (the kernel closes a killed process's sockets at
    once); silence for `timeout_s` means its host is gone or frozen. Process 0 relays a loss
    ("gone K ...") to the others before it stops, so every process names the same one. Exiting
    with os._exit is deliberate: the main thread may be blocked inside a collective that cannot
    complete, and nothing there can be saved consistently.
    """

    def __init__(self, conns: dict[int, socket.socket], pid: int, count: int,
                 timeout_s: float, exit_fn=os._exit) -> None:
        self.conns, self.pid, self.count, self.timeout_s = dict(conns), pid, count, timeout_s
        self.interval = min(5.0, max(timeout_s / 8, 0.05))
        self.exit_fn = exit_fn
        self.buffers = {k: b"" for k in self.conns}
        self.last_seen = {k: time.monotonic() for k in self.conns}
        self.closed: set[int] = set()  # peers that said done/failed, then closed
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="disco-peer-watch", daemon=True)

    def start(self) -> PeerWatch:
        for conn in self.conns.values():
            conn.settimeout(1.0)  # reads only follow select(); a send to a stuck peer gives up
        self.thread.start()
        return self

    def _send_all(self, line: str) -> None:
        for k, conn in self.conns.items():
            if k not in self.closed:
                try:
                    conn.sendall(line.encode())
                except OSError:  # a dead peer: its end of stream is what names it
                    pass

    def _run(self) -> None:
        next_beat = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= next_beat:
                with self.lock:
                    if self.stopping.is_set():
                        return
                    self._send_all("hb\n")
                next_beat = now + self.interval
            live = [c for k, c in self.conns.items() if k not in self.closed]
            if not live:
                return
            try:
                readable, _, _ = select.select(live, [], [], self.interval)
            except (OSError, ValueError):  # a socket closed under us by finish()
                return
            for conn in readable:
                peer = next(k for k, c in self.conns.items() if c is conn)
                self._read(peer, conn)
            now = time.monotonic()
            for peer, seen in self.last_seen.items():
                if peer not in self.closed and now - seen > self.timeout_s:
                    self._lost(peer, f"stopped responding ({now - seen:.0f} s without a"
                                     " heartbeat: its host is down, frozen or unreachable)")

    def _read(self, peer: int, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except TimeoutError:
            return
        except OSError:  # reset by the peer
            data = b""
        if not data:
            if not self.stopping.is_set():
                self._lost(peer, "exited or was killed (its connection closed)")
            return
        self.last_seen[peer] = time.monotonic()
        self.buffers[peer] += data
        while b"\n" in self.buffers[peer]:
            line, _, self.buffers[peer] = self.buffers[peer].partition(b"\n")
            self._message(peer, line.decode(errors="replace").strip())

    def _message(self, peer: int, line: str) -> None:
        if line in ("done", "failed"):
            self.closed.add(peer)
            if line == "failed":
                log.error("process %d of %d stopped with an error (see its own output)",
                          peer, self.count)
        elif line.startswith("gone "):  # from process 0: another process is lost
            _, who, reason = line.split(" ", 2)
            self._lost(int(who), reason, relayed=True)

    def _lost(self, peer: int, reason: str, relayed: bool = False) -> None:
        with self.lock:
            if self.stopping.is_set():
                return
            self.stopping.set()
            if self.pid == 0 and not relayed:  # tell the others whom to name
                self.closed.add(peer)
                self._send_all(f"gone {peer} {reason}\n")
        step = _progress["step"]
        at = f" near step {step}" if step is not None else ""
        message = (
            f"error: process {peer} of {self.count} {reason}{at}; stopping process {self.pid}"
            f" too (a collective cannot complete without it). Checkpoints already complete are"
            f" intact: start all {self.count} processes again with the same command to resume."
        )
        print(message, file=sys.stderr, flush=True)
        self.exit_fn(EXIT_PEER_LOST)

    def finish(self, ok: bool = True) -> None:
        """Tell the peers this process ends on purpose, then close the connections."""
        with self.lock:
            if self.stopping.is_set():
                return
            self.stopping.set()
            self._send_all("done\n" if ok else "failed\n")
        for conn in self.conns.values():
            try:
                conn.close()
            except OSError:
                pass


def watch(conns: dict[int, socket.socket], pid: int, count: int, timeout_s: float) -> None:
    """Start this process's `PeerWatch` (one per process)."""
    global _watch
    _watch = PeerWatch(conns, pid, count, timeout_s).start()


def explain_failure(grace_s: float = 10.0) -> None:
    """On an unexpected error: if a peer was lost, let the watchdog name it (it exits).

    A collective whose peer died can fail in this process (gloo: "connection closed") at about
    the moment the watchdog notices the death; the death is the real cause, so it is given
    `grace_s` to be named before the error's own traceback is shown.
    """
    if _watch is None:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _watch.thread.is_alive():
        _watch.thread.join(0.1)
    finish(ok=False)


def finish(ok: bool = True) -> None:
    """Call when this process ends on purpose (done, preempted, or its own error)."""
    global _watch
    if _watch is not None:
        _watch.finish(ok)
        _watch = None
