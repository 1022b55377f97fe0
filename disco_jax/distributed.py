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
A process that dies later is caught by the coordination service's heartbeat (also `timeout_s`),
which terminates the others instead of letting them hang in a collective.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import jax

from disco_jax.errors import ConfigError

log = logging.getLogger("disco_jax")


class DistributedError(ConfigError):
    """A process never arrived or the coordinator is unreachable."""


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
        return
    if explicit["count"] == 1:
        return
    # CPU devices need a collectives backend across processes (GPUs/TPUs ignore this setting).
    # Do not ask jax.default_backend() here: it would start the backends too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    rendezvous(explicit["address"], explicit["count"], explicit["id"], timeout_s)
    jax.distributed.initialize(explicit["address"], num_processes=explicit["count"],
                               process_id=explicit["id"], initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=timeout_s)
    log.info("jax.distributed: process %d of %d, coordinator %s", jax.process_index(),
             jax.process_count(), explicit["address"])


def _rendezvous_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port) + 1


def rendezvous(address: str, count: int, pid: int, timeout_s: float) -> None:
    """Every process checks in with process 0 on PORT+1, or all fail naming who is missing."""
    host, port = _rendezvous_address(address)
    deadline = time.monotonic() + timeout_s
    if pid == 0:
        _serve(port, count, deadline, address, timeout_s)
    else:
        _join(host, port, pid, deadline, address, timeout_s)


def _serve(port: int, count: int, deadline: float, address: str, timeout_s: float) -> None:
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
            conn.close()
    finally:
        server.close()
    if missing:
        raise DistributedError(_missing_message(missing, count, address, timeout_s))


def _join(host: str, port: int, pid: int, deadline: float, address: str,
          timeout_s: float) -> None:
    reply = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2.0) as conn:
                conn.sendall(f"{pid}\n".encode())
                conn.settimeout(max(deadline - time.monotonic(), 1.0) + 5.0)
                reply = conn.recv(256).decode().strip()
            break
        except OSError:  # not listening yet (refused) or slow: retry until the deadline
            time.sleep(0.2)
    if reply == "ok":
        return
    if reply.startswith("missing "):
        missing = [int(x) for x in reply.split()[1].split(",")]
        raise DistributedError(_missing_message(missing, None, address, timeout_s))
    raise DistributedError(
        f"process {pid}: the coordinator (process 0) at {address} did not answer within"
        f" {timeout_s:g} s; start process 0 with the same --coordinator_address, or raise"
        " --distributed_timeout"
    )


def _missing_message(missing: list[int], count: int | None, address: str,
                     timeout_s: float) -> str:
    of = f" of {count}" if count else ""
    return (
        f"process(es) {', '.join(map(str, missing))}{of} never arrived at the coordinator"
        f" {address} within {timeout_s:g} s; start every process with the same"
        " --coordinator_address and --num_processes, or raise --distributed_timeout"
    )
