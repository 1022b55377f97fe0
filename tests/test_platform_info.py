"""The start-of-run backend line, and the warning when a GPU/TPU machine ends up on the CPU."""

from __future__ import annotations

import logging

import jax
import pytest

from disco_jax import platform_info, train
from disco_jax.platform_info import Probes, accelerator_mismatch


def test_describe_backend_names_platform_devices_kind_and_processes():
    line = platform_info.describe_backend()
    n = jax.device_count()  # 8 fake CPU devices (conftest)
    assert f"on cpu: {n} device(s) ({n} local) of kind cpu; process 0 of 1" in line
    assert jax.__version__ in line


@pytest.mark.parametrize("probes", [
    Probes(),
    Probes(vfio=True),  # /dev/vfio alone is common on machines without a TPU
    Probes(tpu_env=("TPU_NAME",)),  # a stray variable without the device
])
def test_no_warning_without_an_accelerator(probes):
    assert accelerator_mismatch("cpu", probes) is None


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_no_warning_when_jax_uses_the_accelerator(backend):
    everything = Probes(nvidia_device=True, nvidia_smi=True, accel_device=True, vfio=True,
                        tpu_env=("TPU_ACCELERATOR_TYPE",))
    assert accelerator_mismatch(backend, everything) is None


@pytest.mark.parametrize("probes,seen", [
    (Probes(nvidia_device=True), "/dev/nvidia0"),
    (Probes(nvidia_smi=True), "nvidia-smi"),
    (Probes(nvidia_device=True, nvidia_smi=True, jax_platforms="cuda,cpu"),
     "/dev/nvidia0, nvidia-smi"),
])
def test_gpu_machine_on_cpu_warns_with_the_cuda_install_line(probes, seen):
    msg = accelerator_mismatch("cpu", probes)
    assert msg.startswith("JAX IS RUNNING ON THE CPU although this machine has an NVIDIA GPU")
    assert f"({seen})" in msg
    assert f'pip install "jax[cuda12]=={jax.__version__}"' in msg
    assert "\n" not in msg


@pytest.mark.parametrize("probes,seen", [
    (Probes(accel_device=True), "/dev/accel0"),
    (Probes(vfio=True, tpu_env=("TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID")),
     "/dev/vfio, TPU_ACCELERATOR_TYPE, TPU_WORKER_ID"),
])
def test_tpu_machine_on_cpu_warns_with_the_tpu_install_line(probes, seen):
    msg = accelerator_mismatch("cpu", probes)
    assert msg.startswith(f"JAX IS RUNNING ON THE CPU although this machine has a TPU ({seen})")
    assert f'pip install "jax[tpu]=={jax.__version__}"' in msg


def test_forced_cpu_says_which_variable_to_unset():
    msg = accelerator_mismatch("cpu", Probes(nvidia_smi=True, jax_platforms="cpu"))
    assert "NVIDIA GPU" in msg and "JAX_PLATFORMS=cpu asks for the CPU; unset it" in msg
    assert "pip install" not in msg


def test_probe_reads_the_machine(monkeypatch):
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(platform_info.shutil, "which", lambda name: None)
    probes = platform_info.probe()
    assert "TPU_ACCELERATOR_TYPE" in probes.tpu_env and probes.jax_platforms == "cpu"
    assert not probes.nvidia_smi
    monkeypatch.setattr(platform_info.shutil, "which",
                        lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert platform_info.probe().nvidia_smi


def test_log_backend_logs_the_backend_and_warns(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="disco_jax")
    monkeypatch.setattr(platform_info, "probe", lambda: Probes())
    assert platform_info.log_backend() is None
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert caplog.records[0].getMessage() == platform_info.describe_backend()
    caplog.clear()
    monkeypatch.setattr(platform_info, "probe", lambda: Probes(nvidia_smi=True))
    warning = platform_info.log_backend()
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING]
    assert caplog.records[1].getMessage() == warning and "NVIDIA GPU" in warning


def test_train_run_logs_the_backend_first(monkeypatch):
    # Before the config is even looked at: a run that fails validation still says where it ran.
    class Logged(Exception):
        pass

    def log_backend(logger=None):
        raise Logged

    monkeypatch.setattr(platform_info, "log_backend", log_backend)
    with pytest.raises(Logged):
        train.run(None, "/nonexistent/workdir")
