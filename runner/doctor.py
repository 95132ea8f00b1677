"""`byol-runner doctor`: is this machine ready to run tasks? Each check says ok, warn or fail, what it
saw, and, when not ok, what to do. Exit 0 when nothing failed.

Checks: the docker SDK, the daemon, the task image, the GPU runtime (a throwaway container running
`nvidia-smi -L` with a GPU request; a warning only on a host with no NVIDIA GPU), Ray, and PyTorch
on this machine (for the local executor)."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass



@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""


def run_checks(image: str, gpu: bool = True) -> list[Check]:
    from runner.system import visible_gpus

    checks: list[Check] = []
    host_gpus = visible_gpus()
    checks.append(Check("GPUs on this host", "ok" if host_gpus else "warn",
                        f"{len(host_gpus)} visible (nvidia-smi -L)" if host_gpus else "none: tasks run on the CPU",
                        "" if host_gpus else "install the NVIDIA driver if this machine has a GPU"))
    client = None
    if importlib.util.find_spec("docker") is None:
        checks.append(Check("docker SDK", "fail", "not installed", "pip install docker"))
    else:
        from runner.executors.docker import DAEMON_FIX, DaemonUnreachable, connect

        try:
            client = connect(timeout=15)
            v = client.version()
            checks.append(Check("Docker daemon", "ok", f"Engine {v.get('Version')}, API {v.get('ApiVersion')}"))
        except DaemonUnreachable as e:
            checks.append(Check("Docker daemon", "fail", e.reason, DAEMON_FIX))
    if client is not None:
        image_check = _image_check(client, image)
        checks.append(image_check)
        checks.append(_gpu_runtime_check(client, image, image_check.status == "ok", host_gpus, gpu))
    else:
        checks.append(Check("image", "skip", f"{image}: no daemon to ask"))
        checks.append(Check("GPU runtime", "skip", "no daemon to ask"))
    checks.append(_ray_check())
    checks.append(_torch_check())
    return checks


def _image_check(client, image: str) -> Check:  # noqa: ANN001
    import docker

    from runner.executors.docker import image_fix

    try:
        img = client.images.get(image)
    except docker.errors.ImageNotFound:
        return Check("image", "fail", f"{image}: not found", image_fix(image))
    size = img.attrs.get("Size", 0) / 2**30
    return Check("image", "ok", f"{image} ({img.short_id}, {size:.1f} GiB)")


def _gpu_runtime_check(client, image: str, have_image: bool, host_gpus: list[int], gpu: bool) -> Check:  # noqa: ANN001
    import docker
    from docker.types import DeviceRequest

    from runner.executors.docker import GPU_FIX, is_gpu_runtime_error

    if not gpu:
        return Check("GPU runtime", "skip", "not checked (--no-gpu)")
    severity = "fail" if host_gpus else "warn"
    if not have_image:
        return Check("GPU runtime", "skip", f"needs the image {image} to test with")
    from runner.executors.docker_spec import LABEL

    container = None
    try:
        container = client.containers.create(
            image, ["nvidia-smi", "-L"], network_mode="none", entrypoint=[], labels={f"{LABEL}.doctor": "1"},
            device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])],
            environment={"NVIDIA_DRIVER_CAPABILITIES": "compute,utility"},
        )
        container.start()
        code = container.wait(timeout=120).get("StatusCode", 1)
        out = container.logs()
    except docker.errors.APIError as e:
        if is_gpu_runtime_error(e):
            what = "missing: Docker cannot give containers a GPU" + ("" if host_gpus else " (this host has no GPU either)")
            return Check("GPU runtime", severity, what, GPU_FIX)
        return Check("GPU runtime", severity, f"a GPU container failed: {e.explanation or e}", GPU_FIX)
    except Exception as e:  # noqa: BLE001 - a wait that timed out, a daemon that went away
        return Check("GPU runtime", severity, f"a GPU container did not finish: {e}", GPU_FIX)
    finally:
        if container is not None:
            try:
                container.remove(force=True)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass
    if code != 0:
        return Check("GPU runtime", severity, f"nvidia-smi in a container exited {code}: {out.decode(errors='replace')[-200:]}",
                     GPU_FIX)
    lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("GPU ")]
    return Check("GPU runtime", "ok", f"{len(lines)} GPU(s) in a container: " + "; ".join(lines)[:200])


def _ray_check() -> Check:
    if importlib.util.find_spec("ray") is None:
        return Check("Ray", "warn", "not installed (only the ray executor needs it)", 'pip install "ray[default]"')
    from importlib.metadata import version

    return Check("Ray", "ok", f"ray {version('ray')} installed")


def _torch_check() -> Check:
    try:
        import torch
    except ImportError:
        return Check("PyTorch", "fail", "not installed (the local executor's workers need it)", "pip install torch torchvision")
    cuda = torch.cuda.is_available()
    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU build"
    detail = f"torch {torch.__version__} ({build}), " + (f"CUDA on {torch.cuda.device_count()} GPU(s)" if cuda else "CPU only")
    if torch.version.cuda and not cuda:  # the CUDA libraries installed for nothing
        size = _cuda_libraries_size()
        return Check("PyTorch", "warn", f"{detail}: this machine has no GPU, and the CUDA build's libraries take "
                     f"{size / 2**30:.1f} GB here", "a CPU build saves them: pip install --force-reinstall torch torchvision "
                     "--index-url https://download.pytorch.org/whl/cpu (or `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` "
                     "in a fresh checkout)")
    return Check("PyTorch", "ok", detail)


def _cuda_libraries_size() -> int:
    """Bytes of the NVIDIA wheels installed beside torch (site-packages/nvidia, triton)."""
    import os
    import site
    from pathlib import Path

    total = 0
    for sp in site.getsitepackages():
        for name in ("nvidia", "triton"):
            for root, _, files in os.walk(Path(sp) / name):
                total += sum((Path(root) / f).stat().st_size for f in files if not (Path(root) / f).is_symlink())
    return total


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
