"""Which backend and devices JAX uses, and a loud warning when a GPU or TPU machine trains on CPU.

A CPU-only jaxlib on a GPU machine (plain `pip install jax`, or `requirements.txt`'s CPU lock)
does not fail: JAX falls back to the CPU with one warning among the start-up lines, and a run
that should take minutes takes days. `train.run` calls `log_backend` first, so the first lines
of every run say where it runs, and say it loudly when that is the CPU of a GPU or TPU machine.

The machine is probed without JAX (device files, `nvidia-smi` on PATH, TPU_* variables), and
the decision is the pure function `accelerator_mismatch(backend, probes)`, so tests can hand it
fake probes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import jax

log = logging.getLogger("disco_jax")


@dataclasses.dataclass(frozen=True)
class Probes:
    """What the machine shows of its accelerators, whatever JAX found."""

    nvidia_device: bool = False  # /dev/nvidia0 exists (the NVIDIA driver is loaded)
    nvidia_smi: bool = False  # nvidia-smi is on PATH
    accel_device: bool = False  # /dev/accel0 exists (TPU v2-v4 VMs)
    vfio: bool = False  # /dev/vfio exists (TPU v5e and later VMs; also other machines)
    tpu_env: tuple[str, ...] = ()  # names of the TPU_* environment variables that are set
    jax_platforms: str = ""  # $JAX_PLATFORMS ("" when unset)


def probe() -> Probes:
    """This machine's probes."""
    return Probes(
        nvidia_device=os.path.exists("/dev/nvidia0"),
        nvidia_smi=shutil.which("nvidia-smi") is not None,
        accel_device=os.path.exists("/dev/accel0"),
        vfio=os.path.isdir("/dev/vfio"),
        tpu_env=tuple(sorted(k for k in os.environ if k.startswith("TPU_"))),
        jax_platforms=os.environ.get("JAX_PLATFORMS", ""),
    )


def describe_backend() -> str:
    """One line: JAX's platform, device count and kind, and the processes."""
    devices = jax.devices()
    kinds = ", ".join(sorted({d.device_kind for d in devices}))
    return (f"JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} device(s)"
            f" ({jax.local_device_count()} local) of kind {kinds}; process"
            f" {jax.process_index()} of {jax.process_count()}")


def _forced_cpu(jax_platforms: str) -> bool:
    names = {p.strip().lower() for p in jax_platforms.split(",") if p.strip()}
    return bool(names) and names <= {"cpu"}


def accelerator_mismatch(backend: str, probes: Probes) -> str | None:
    """The warning to log when JAX runs on `backend` "cpu" although `probes` show an NVIDIA GPU
    or a TPU; None when they agree (or the machine shows neither)."""
    if backend != "cpu":
        return None
    if probes.nvidia_device or probes.nvidia_smi:
        kind, extra = "an NVIDIA GPU", "cuda12"
        seen = [s for s, ok in (("/dev/nvidia0", probes.nvidia_device),
                                ("nvidia-smi", probes.nvidia_smi)) if ok]
    elif probes.accel_device or (probes.vfio and probes.tpu_env):
        kind, extra = "a TPU", "tpu"
        seen = ["/dev/accel0"] if probes.accel_device else ["/dev/vfio", *probes.tpu_env]
    else:
        return None
    head = (f"JAX IS RUNNING ON THE CPU although this machine has {kind} ({', '.join(seen)}):"
            " training will be orders of magnitude slower.")
    if _forced_cpu(probes.jax_platforms):
        return f"{head} JAX_PLATFORMS={probes.jax_platforms} asks for the CPU; unset it."
    return (f"{head} The installed jaxlib cannot use it (or could not start it; JAX's own"
            f' message is above): pip install "jax[{extra}]=={jax.__version__}"')


def log_backend(logger: logging.Logger | None = None) -> str | None:
    """Log `describe_backend()`, and `accelerator_mismatch` as a warning; returns the warning."""
    logger = logger or log
    logger.info("%s", describe_backend())
    warning = accelerator_mismatch(jax.default_backend(), probe())
    if warning:
        logger.warning("%s", warning)
    return warning
