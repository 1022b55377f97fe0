"""Benchmark of the production train step (and, with --peers, PyTorch peers of the same step).

    python -m disco_jax.bench --suite smoke|paper|host --out DIR [--peers] [--steps N]
        [--warmup N] [--cases a,b] [--parts step,teacher_fwd,student_step,loss] [--devices N]
        [--peer-backend inductor|aot_eager|...]

For every case (`cases.CASES`: SEED R50 -> MBv3-L / EffB0 / R18, DisCo R50 -> EffB0, MoCo-v2
R50, MCL R18 x 2) it times `train.make_train_step` jitted exactly as `train.run` jits it (same
shardings, state donated) on a synthetic, device-resident uint8 batch of the shape the method's
stream gives, and, for the teacher/student pairs, the teacher forward, the student step and the
loss alone (`cases` says what each part contains). TensorFlow is never imported (no input
pipeline runs). `--suite paper`: batch 256 per device at 224 px in bfloat16 (losses stay
float32), 50 timed steps after 10; `--suite smoke`: the recipes' tiny smoke networks, batch 16
at 32 px in float32, 5 after 2, for CPUs and tests (compiles dominate: about a minute for
seed_r50_r18 with all parts on a 2-core machine, cold cache); `--suite host`: the input
pipeline (`disco_jax.bench.host`; the arguments after `--suite host` are that module's own, e.g.
`--out DIR --seconds 20 --threads 2`).

What is run is the recipe with the benchmark's overrides, so that JAX and the PyTorch peers
compute the same function on the same float inputs: the device augmentation replaced by
normalisation only (`data.normalize`), dropout and drop-connect off, BN over the whole batch
(`loss.bn_group_size=0`) and `loss.key_bn="global"` where the method has them (on one GPU the
official per-GPU BN is the whole batch and shuffle-BN a no-op), an untrained teacher.

Each case runs in its own process (`--worker`), so that the device's peak memory is the case's
own, the accelerator is not held by this parent, and the peers of a case run beside it on the
same state. `--peers` calls `disco_jax.bench.peers.run_peer` in styles p0 (the official code's
way) and p1 (a strong PyTorch user's) on the JAX case's initial weights and inputs, and checks
that their step-1 loss equals JAX's within 1e-3 relative.

Writes DIR/bench.json (`{"records": [...], "machine": {...}}`, `report.RECORD_FIELDS`) and
DIR/bench.md, prints the table, and progress lines with an ETA on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from disco_jax.bench import cases, report, timing
from disco_jax.errors import ConfigError

PEER_STYLES = ("p0", "p1")
# JAX must not take the GPU's memory up front: torch peers run in the same process, and a run
# with peers must measure JAX as one without. Read when the backend starts.
ENV_DEFAULTS = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (not usage + message)
        from disco_jax.cli import fail

        fail(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python -m disco_jax.bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", required=True, help=", ".join(cases.ALL_SUITES))
    p.add_argument("--out", required=True, help="directory for bench.json and bench.md")
    p.add_argument("--peers", action="store_true", help="also the PyTorch peers (needs torch)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (paper 50, smoke 5)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps after the first (paper 10, smoke 2)")
    p.add_argument("--cases", default=",".join(cases.CASES), help="comma-separated case names")
    p.add_argument("--parts", default=",".join(cases.PARTS), help="comma-separated parts")
    p.add_argument("--peer-backend", default="inductor",
                   help="torch.compile backend of the p1 peer (tests: aot_eager, the same"
                        " tracing without code generation)")
    p.add_argument("--devices", type=int, default=1,
                   help="mesh size; the global batch is the suite's batch x devices")
    p.add_argument("--in-process", action="store_true",
                   help="run every case in this process (peak memory is then XLA's estimate"
                        " after the first measurement)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Checked and defaulted arguments; ConfigError (one line) before anything runs."""
    if args.suite not in cases.ALL_SUITES:
        raise ConfigError(f"unknown suite {args.suite!r}; valid suites: "
                          + ", ".join(cases.ALL_SUITES))
    suite = cases.SUITES[args.suite]
    args.cases = cases.check_cases([c for c in args.cases.split(",") if c])
    args.parts = tuple(cases.check_parts([c for c in args.parts.split(",") if c]))
    args.steps = suite.steps if args.steps is None else args.steps
    args.warmup = suite.warmup if args.warmup is None else args.warmup
    if args.steps < 1 or args.warmup < 0 or args.devices < 1:
        raise ConfigError(f"--steps must be >= 1, --warmup >= 0 and --devices >= 1; got"
                          f" {args.steps}, {args.warmup}, {args.devices}")
    if args.peers:
        if "step" not in args.parts:
            raise ConfigError("--peers compares the step: keep 'step' in --parts")
        for module, hint in (("torch", "install PyTorch (pip install torch)"),
                             ("disco_jax.bench.peers", "disco_jax/bench/peers.py is missing")):
            if not _importable(module):
                raise ConfigError(f"--peers needs {module}, which is not importable; {hint}")
    return args


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- one case (worker)


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """Where and with what the figures were measured (perf.md §6: record it all)."""
    import jax

    device = jax.devices()[0]

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    info = {
        "suite": args.suite, "steps": args.steps, "warmup": args.warmup,
        "parts": list(args.parts), "device_kind": device.device_kind,
        "platform": device.platform, "num_devices": args.devices,
        "visible_devices": jax.device_count(), "jax_version": jax.__version__,
        **{f"{d}_version": version(d) for d in ("jaxlib", "flax", "optax")},
        "python": platform.python_version(), "host_cpus": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        "tensorflow_imported": sys.modules.get("tensorflow") is not None,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.peers:
        info["torch_version"] = version("torch")
    return info


def common_fields(built: cases.Built, args: argparse.Namespace) -> dict[str, Any]:
    import jax

    return {"case": built.name, "device_kind": jax.devices()[0].device_kind,
            "num_devices": int(built.ctx["mesh"].devices.size), "dtype": built.config.dtype,
            "batch": int(built.config.batch_size), "image_size": int(built.config.data.image_size),
            "jax_version": jax.__version__, "steps": args.steps}


def flops_for_mfu(record: dict) -> tuple[float | None, str | None]:
    """perf.md's analytic FLOPs where the case has them, else XLA's (and which)."""
    if record.get("flops_per_img_table"):
        return record["flops_per_img_table"], "table"
    if record.get("flops_per_img"):
        return record["flops_per_img"], "xla"
    return None, None


def measure(built: cases.Built, part: cases.Part, args: argparse.Namespace,
            first_in_process: bool) -> tuple[dict, tuple]:
    """The record of one part, and its last arguments (a train step's: the state it left)."""
    import jax

    compiled, compile_s = timing.compile_timed(part.fn, part.args)
    loss, times, last = timing.run_steps(compiled, part.args, args.steps, args.warmup,
                                         part.threads_state, part.loss_of)
    devices = list(built.ctx["mesh"].devices.flat)
    mem, mem_source = timing.peak_memory(compiled, devices, first_in_process)
    batch = int(built.config.batch_size)
    flops = timing.xla_flops(compiled)
    table = cases.table_gflop(built.name, part.name, built.config)
    rec = {**common_fields(built, args), "part": part.name, "impl": "jax",
           **timing.summarize(times, batch), "compile_s": round(compile_s, 3),
           "peak_mem_bytes": mem, "peak_mem_source": mem_source,
           "flops_per_img": None if flops is None else flops / batch,
           "flops_per_img_table": None if table is None else table * 1e9,
           "loss_step1": loss}
    used, rec["mfu_flops"] = flops_for_mfu(rec)
    rec["mfu"] = timing.mfu(rec["img_per_sec"], used,
                            timing.peak_flops(devices[0].device_kind, jax.default_backend()))
    return rec, last


def peer_spec(built: cases.Built, host_state: dict, spec_class: Any) -> Any:
    """The peers' view of the case: its initial (pre-donation) weights and extra state, the
    normalised inputs, labels and the step-0 learning rate."""
    import jax
    import numpy as np

    student_vars, extra = cases.split_host_state(host_state)
    return spec_class(
        case=built.config.method, config=built.config, student_vars=student_vars,
        teacher_vars=built.host_teacher_vars, extra=extra, inputs=cases.peer_inputs(built),
        labels=np.asarray(jax.device_get(built.batch["label"])) if "label" in built.batch
        else None,
        lr=float(built.schedule(0)), batch=int(built.config.batch_size),
        image_size=int(built.config.data.image_size))


def peer_record(result: dict, style: str, jax_step: dict, peak: float | None) -> dict:
    """A peer's result with the case's common fields, its MFU on the JAX step's FLOP count
    (the same work), and whether its step-1 loss agrees with JAX's."""
    common = {k: jax_step[k] for k in ("case", "device_kind", "num_devices", "batch",
                                       "image_size", "jax_version", "steps",
                                       "flops_per_img", "flops_per_img_table", "mfu_flops")}
    # The case's name last: a peer's own `case` is its method (the PeerSpec's).
    rec = {"peak_mem_source": "torch", **result, **common, "part": "step",
           "impl": f"torch_{style}"}
    used, _ = flops_for_mfu(jax_step)
    rec["mfu"] = timing.mfu(rec["img_per_sec"], used, peak)
    rec["loss_rel_diff"], rec["loss_agrees"] = report.loss_agreement(
        jax_step["loss_step1"], result.get("loss_step1"))
    rec["loss_jax"] = jax_step["loss_step1"]
    return rec


def run_peers(built: cases.Built, host_state: dict, jax_step: dict, args: argparse.Namespace,
              failures: list[str], notes: list[str]) -> list[dict]:
    import jax

    peers = importlib.import_module("disco_jax.bench.peers")
    supported = getattr(peers, "METHODS", None)  # the methods the peers implement
    if supported is not None and built.config.method not in supported:
        notes.append(f"{built.name}: no torch peer for method {built.config.method!r}")
        progress(f"  {notes[-1]}; skipped")
        return []
    spec = peer_spec(built, host_state, peers.PeerSpec)
    peak = timing.peak_flops(jax.devices()[0].device_kind, jax.default_backend())
    out = []
    for style in PEER_STYLES:
        try:
            result = peers.run_peer(spec, style, steps=args.steps, warmup=args.warmup,
                                    backend=args.peer_backend)
        except Exception as e:  # noqa: BLE001 -- one peer failing must not lose the others
            traceback.print_exc()
            failures.append(f"{built.name} torch_{style}: {type(e).__name__}: {e}")
            continue
        rec = peer_record(result, style, jax_step, peak)
        progress(f"  {built.name} step torch_{style}: {rec['img_per_sec']:,.0f} img/s, loss"
                 f" {'agrees' if rec['loss_agrees'] else 'DISAGREES'}"
                 f" (rel. diff {rec['loss_rel_diff']})")
        out.append(rec)
    return out


def run_case(name: str, args: argparse.Namespace, first_in_process: bool = True
             ) -> tuple[list[dict], dict]:
    """(records, machine) of case `name`: its parts in order (the step first: its device peak
    is then the case's own), then the peers on the same initial state."""
    import jax

    failures: list[str] = []
    notes: list[str] = []
    built = cases.build(name, args.suite, args.devices)
    host_state = jax.device_get(built.state) if args.peers else None  # before the donation
    records, state = [], built.state
    for part_name in cases.parts_of(built, args.parts):
        part = cases.make_part(built, part_name, state)
        rec, last = measure(built, part, args, first_in_process)
        first_in_process = False
        if part.threads_state:
            state = last[0]  # the next train-step part continues from the state left
        progress(f"  {name} {part_name}: compile {rec['compile_s']:.1f} s,"
                 f" {rec['step_ms_median']:.2f} ms/step, {rec['img_per_sec']:,.0f} img/s")
        records.append(rec)
    jax_step = next((r for r in records if r["part"] == "step"), None)
    if args.peers and jax_step is not None:
        records += run_peers(built, host_state, jax_step, args, failures, notes)
    machine = machine_info(args)
    machine["failures"], machine["notes"] = failures, notes
    return records, machine


# --------------------------------------------------------------------------- the parent


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def format_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def worker_argv(case: str, args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "disco_jax.bench", "--worker", "--suite", args.suite,
            "--out", args.out, "--cases", case, "--parts", ",".join(args.parts),
            "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--devices", str(args.devices)]
    return argv + (["--peers", "--peer-backend", args.peer_backend] if args.peers else [])


def case_file(out: str, case: str) -> Path:
    return Path(out) / "cases" / f"{case}.json"


def spawn(case: str, args: argparse.Namespace) -> tuple[list[dict], dict | None, str | None]:
    """(records, machine, failure) of a case run in its own process."""
    path = case_file(args.out, case)
    path.unlink(missing_ok=True)
    env = {**ENV_DEFAULTS, **os.environ}
    rc = subprocess.run(worker_argv(case, args), env=env).returncode
    if rc != 0 or not path.exists():
        return [], None, f"{case}: the worker exited with status {rc}"
    result = json.loads(path.read_text())
    return result["records"], result["machine"], None


def run_suite(args: argparse.Namespace) -> tuple[list[dict], dict]:
    records: list[dict] = []
    machine: dict[str, Any] = {}
    failures: list[str] = []
    notes: list[str] = []
    t0 = time.perf_counter()
    for i, case in enumerate(args.cases):
        progress(f"[{i + 1}/{len(args.cases)}] {case} ({cases.CASES[case].label}),"
                 f" suite {args.suite}")
        if args.in_process:
            recs, mach = run_case(case, args, first_in_process=i == 0)
            failure = None
        else:
            recs, mach, failure = spawn(case, args)
        records += recs
        machine = machine or dict(mach or {})
        failures += (mach or {}).get("failures", []) + ([failure] if failure else [])
        notes += (mach or {}).get("notes", [])
        elapsed = time.perf_counter() - t0
        left = len(args.cases) - i - 1
        eta = f", ETA {format_s(elapsed / (i + 1) * left)}" if left else ""
        progress(f"[{i + 1}/{len(args.cases)}] {case} {'FAILED' if failure else 'done'};"
                 f" {format_s(elapsed)} so far{eta}")
    machine["failures"], machine["notes"] = failures, notes
    machine["wall_s"] = round(time.perf_counter() - t0, 1)
    return records, machine


def host_argv(argv: list[str] | None) -> list[str] | None:
    """The arguments for `disco_jax.bench.host` when the suite is `host` (its own flags: --images,
    --seconds, --threads, --cases of its streams, ...), else None."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite")
    known, rest = pre.parse_known_args(argv)
    return rest if known.suite == "host" else None


def main(argv: list[str] | None = None) -> list[dict]:
    from disco_jax.cli import fail

    rest = host_argv(argv)
    if rest is not None:
        if not _importable("disco_jax.bench.host"):
            fail("--suite host needs disco_jax/bench/host.py, which is missing")
        records = importlib.import_module("disco_jax.bench.host").main(rest)
        progress(f"host suite: {len(records)} records")
        return records
    args = parse_args(argv)
    try:
        args = resolve(args)
    except ConfigError as e:
        fail(str(e))
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)  # this process's backend (in-process, worker)
    from disco_jax.bench import knn

    knn.force_host_devices(args.devices)  # before jax is imported: CPU fake devices
    if args.worker:
        try:
            records, machine = run_case(args.cases[0], args)
        except ConfigError as e:
            fail(str(e))
        path = case_file(args.out, args.cases[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"records": records, "machine": machine}, indent=2))
        return records
    records, machine = run_suite(args)
    paths = report.write(args.out, records, machine)
    print(report.table(records))
    progress(f"wrote {paths[0]} and {paths[1]}")
    if machine["failures"]:
        progress("failures: " + "; ".join(machine["failures"]))
        sys.exit(1)
    return records


if __name__ == "__main__":
    main()
