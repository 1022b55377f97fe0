"""What a surviving process sees when its peer dies or freezes mid-run, with and without our
watchdog (disco_jax/distributed.py `PeerWatch`). The figures in launch/README.md come from it.

    python launch/probe_peer_loss.py --out /tmp/probe [--heartbeat_s 20] [--watchdog both]

Each case starts two processes on this machine (one CPU device each, gloo collectives), the way
`disco_jax.main` starts them (`distributed.initialize`, or plain `jax.distributed.initialize`
when the watchdog is off), runs a jitted all-reduce over both processes in a loop, then sends
the victim SIGKILL (a crash) or SIGSTOP (a frozen host: the process exists, its sockets stay
open, it answers nothing). It records how long the survivor takes to exit, its exit status and
the last lines it printed, and writes DIR/probe.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

CASES = {  # name: (victim process, signal)
    "kill_1": (1, signal.SIGKILL),
    "kill_0": (0, signal.SIGKILL),
    "freeze_1": (1, signal.SIGSTOP),
    "freeze_0": (0, signal.SIGSTOP),
}
WARM_STEPS = 20  # the victim is signalled once both processes have done this many all-reduces


def child(pid: int, port: int, heartbeat_s: int, watchdog: bool) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    address = f"127.0.0.1:{port}"
    if watchdog:
        from disco_jax import distributed

        distributed.initialize(address, 2, pid, timeout_s=heartbeat_s)
    else:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, num_processes=2, process_id=pid,
                                   initialization_timeout=heartbeat_s,
                                   heartbeat_timeout_seconds=heartbeat_s)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sh = NamedSharding(mesh, P("data"))
    total = jax.jit(lambda x: jnp.sum(x), out_shardings=NamedSharding(mesh, P()))
    step = 0
    try:
        while True:
            x = jax.make_array_from_process_local_data(sh, np.ones((4,), np.float32) * step)
            value = float(total(x))  # both processes must take part: a collective
            step += 1
            print(f"step {step} {value}", flush=True)
            time.sleep(0.05)
    except Exception:
        # As disco_jax.main does: the all-reduce can fail here ("connection reset by peer")
        # a moment before the watchdog reads the closed socket; give it the chance to name
        # the peer before the collective's own error is shown.
        if watchdog:
            distributed.explain_failure()
        raise


def free_port_pair() -> int:
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", 0))
                port = a.getsockname()[1]
                b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free pair of ports")


def wait_steps(proc: subprocess.Popen, steps: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False
        if line.startswith("step ") and int(line.split()[1]) >= steps:
            return True
    return False


def run_case(name: str, heartbeat_s: int, watchdog: bool, limit_s: float) -> dict:
    victim, sig = CASES[name]
    port = free_port_pair()
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--child", str(i), "--port", str(port),
         "--heartbeat_s", str(heartbeat_s), "--watchdog", "on" if watchdog else "off"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in (0, 1)]
    record = {"case": name, "watchdog": watchdog, "heartbeat_s": heartbeat_s, "victim": victim,
              "signal": sig.name}
    try:
        if not all(wait_steps(p, WARM_STEPS, 180) for p in procs):
            record["error"] = "the processes did not start"
            return record
        survivor = procs[1 - victim]
        t0 = time.monotonic()
        os.kill(procs[victim].pid, sig)
        try:
            survivor.wait(timeout=limit_s)
            record["noticed_s"] = round(time.monotonic() - t0, 1)
            record["exit_status"] = survivor.returncode
        except subprocess.TimeoutExpired:
            record["noticed_s"] = None  # still running: it hangs
            record["exit_status"] = f"still running after {limit_s:g} s"
    finally:
        for p in procs:
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait()
    err = procs[1 - victim].stderr.read().strip().splitlines()
    # The fatal/error lines (absl's F/E prefix, or ours), then the last lines printed.
    said = [line for line in err if re.match(r"^([FE]\d{4} |error: |.*Error: )", line)]
    record["survivor_message"] = said[0][:400] if said else None
    record["survivor_errors"] = [line[:400] for line in said[:4]]
    record["survivor_last_lines"] = [line[:300] for line in err[-3:]]
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/probe_peer_loss")
    ap.add_argument("--heartbeat_s", type=int, default=20,
                    help="jax's heartbeat timeout and our --distributed_timeout")
    ap.add_argument("--watchdog", choices=["on", "off", "both"], default="both")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.port, args.heartbeat_s, args.watchdog == "on")
        return
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"error: --cases: unknown {unknown}; choose from {sorted(CASES)}")
    arms = {"on": [True], "off": [False], "both": [False, True]}[args.watchdog]
    limit_s = 3 * args.heartbeat_s + 60
    records = []
    for name in names:
        for watchdog in arms:
            print(f"{name}, watchdog {'on' if watchdog else 'off'} ...", file=sys.stderr,
                  flush=True)
            records.append(run_case(name, args.heartbeat_s, watchdog, limit_s))
            r = records[-1]
            print(f"  noticed after {r.get('noticed_s')} s, exit {r.get('exit_status')}:"
                  f" {(r.get('survivor_message') or '')[:300]}", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe.json"), "w") as f:
        json.dump({"records": records}, f, indent=1)
    print(f"wrote {os.path.join(args.out, 'probe.json')}")


if __name__ == "__main__":
    main()
