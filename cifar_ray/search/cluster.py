"""Ray itself, for the search: start a local instance or join a cluster (token
authentication on), size the trials to its resources, check the storage every node reaches.
Ray is imported inside the functions: `configure_auth` must run before any import of it."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from cifar_ray.errors import ConfigError, UserError
from cifar_ray.search.settings import SearchConfig, configure_auth  # noqa: F401 (its callers')

HEAD_NODE = "node:__internal_head__"  # a resource only the Ray head node has
# Auto GPUs per trial worker: four trials share a GPU, which one ResNet-9 trial leaves idle
# (`python -m cifar_ray.bench --sections search --search-shares` compares shares).
AUTO_GPU_SHARE = 0.25
AUTO_CPUS = 4  # per worker: its DataLoader processes feed a GPU share; more rarely helps


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's long connection timeout, on a HOST:PORT nobody serves."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address must be local, auto or HOST:PORT, got '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"cannot reach a Ray cluster at {address}: {exc.strerror or exc}") from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ray(settings, temp_dir: Path) -> None:
    """Start a local Ray instance (see configure_auth) or join a cluster."""
    import ray

    # Ray's Lightning callback stages checkpoints under the temp dir: keep them in the run's.
    env = {"TMPDIR": str(temp_dir)}
    if settings.address == "local":
        # No PreemptionWatcher process per trial: one machine has no spot node to lose.
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        # Ray's processes find their instance by its address, else by searching the machine,
        # which fails beside a second instance (the trials' placement groups then leak and
        # the search hangs): choose the port here and hand it to all of them.
        chosen = "RAY_GCS_SERVER_PORT" not in os.environ
        port = os.environ.setdefault("RAY_GCS_SERVER_PORT", str(_free_port()))
        env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        try:
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                     runtime_env={"env_vars": env}, log_to_driver=True)
        finally:
            if chosen:
                del os.environ["RAY_GCS_SERVER_PORT"]
        return
    if settings.address != "auto":
        _check_reachable(settings.address)
    try:
        # As above: a cluster's head may run another instance too (a test, a notebook).
        env["RAY_ADDRESS"] = _cluster_address(settings.address)
        ray.init(address=env["RAY_ADDRESS"], runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot join the Ray cluster at '{settings.address}': {first}") from None


def _cluster_address(address: str) -> str:
    """The GCS address of the cluster that `address` names; "auto" is resolved once, here,
    so that no Ray process searches the machine for it later."""
    import ray

    if address != "auto":
        return address
    given = os.environ.get("RAY_ADDRESS", "")
    if given and given != "auto" and "://" not in given:
        return given  # a Ray job's driver is told its cluster's GCS address here
    ray.init(address="auto")
    try:
        return ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "overlay", "tmpfs", "apfs"}


def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path` (its deepest mount point)."""
    import psutil

    path, best, kind = path.resolve(), "", "unknown"
    for part in psutil.disk_partitions(all=True):
        mount = Path(part.mountpoint)
        if (path == mount or mount in path.parents) and len(part.mountpoint) > len(best):
            best, kind = part.mountpoint, part.fstype
    return kind


def trials_that_fit(t, cpus: float, gpus: float) -> tuple[float, int]:
    """(GPUs each trial worker takes, how many trials fit at once) on `cpus` and `gpus`; sets
    the automatic (-1) values of `t`: AUTO_GPU_SHARE of a GPU where there are GPUs, and the
    CPUs the GPUs' trials leave per worker (1 to AUTO_CPUS), or 1 without GPUs."""
    gpus_per_worker = (AUTO_GPU_SHARE if gpus else 0.0) if t.gpus_per_worker < 0 else t.gpus_per_worker
    if t.cpus_per_worker < 0:
        by_gpu = int(gpus // (t.workers_per_trial * gpus_per_worker)) if gpus_per_worker else 0
        share = cpus // max(1, by_gpu * t.workers_per_trial) if by_gpu else 1
        t.cpus_per_worker = int(max(1, min(AUTO_CPUS, share)))
    fits = int(cpus // (t.workers_per_trial * t.cpus_per_worker))
    if gpus_per_worker:
        fits = min(fits, int(gpus // (t.workers_per_trial * gpus_per_worker)))
    return gpus_per_worker, fits


def shortfall(t, cpus: float, gpus: float, gpus_per_worker: float) -> str:
    """Why not one trial fits on `cpus` and `gpus`, and the flag that makes one fit."""
    need_cpu = t.workers_per_trial * t.cpus_per_worker
    need_gpu = t.workers_per_trial * gpus_per_worker
    if need_cpu > cpus:
        fix = (f"--cpus-per-worker {int(cpus // t.workers_per_trial)}"
               if cpus >= t.workers_per_trial else f"--workers-per-trial {int(cpus) or 1}")
    else:
        fix = (f"--gpus-per-worker {gpus / t.workers_per_trial:g}" if gpus
               else "--gpus-per-worker 0 (train on CPUs)")
    return (f"a trial needs {need_cpu:g} CPUs and {need_gpu:g} GPUs ({t.workers_per_trial} "
            f"worker{'s' if t.workers_per_trial > 1 else ''} x {t.cpus_per_worker} CPUs), but "
            f"{{where}} has {cpus:g} CPUs and {gpus:g} GPUs: give {fix}")


def machine_resources() -> tuple[int, int]:
    """This machine's CPUs (those this process may use) and GPUs, as a local Ray instance
    counts them."""
    import torch

    return len(os.sched_getaffinity(0)), torch.cuda.device_count()


def concurrency(t, fits: int) -> int:
    """Trials at once: tune.max_concurrent, else as many as fit, never more than the trials."""
    return max(1, min(t.max_concurrent or fits or t.num_samples, t.num_samples))


def plan_resources(cfg: SearchConfig, storage: Path) -> tuple[dict[str, Any], int]:
    """Each trial's ScalingConfig and how many trials run at once. A local instance must hold
    a trial now; a cluster's autoscaler adds nodes when trials ask for them."""
    import ray

    t = cfg.tune
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    print(f"ray: {'local instance' if t.address == 'local' else 'cluster ' + t.address}, "
          f"{nodes} node(s), {cpus:g} CPUs, {gpus:g} GPUs")
    gpus_per_worker, fits = trials_that_fit(t, cpus, gpus)
    if not fits:
        why = shortfall(t, cpus, gpus, gpus_per_worker).format(where="the cluster")
        if t.address == "local":
            raise UserError(why)
        print(f"{why}; trials wait for the cluster's autoscaler to add nodes")
    concurrent = concurrency(t, fits)
    if nodes > 1 and (kind := filesystem_type(storage)) in LOCAL_FILESYSTEMS:
        print(f"warning: results go to {storage}, on a local disk ({kind}): nodes on other "
              "machines cannot write there; put the output dir (or tune.storage) on storage "
              "every node mounts (NFS, EFS)")
    if gpus_per_worker:
        how = "auto: " if t.gpus_per_worker < 0 else ""
        print(f"each trial worker takes {gpus_per_worker:g} GPU ({how}"
              f"{1 / gpus_per_worker:g} trials per GPU) and {t.cpus_per_worker} CPUs; "
              f"{concurrent} trials at a time")
    scaling = {"num_workers": t.workers_per_trial, "use_gpu": gpus_per_worker > 0,
               "resources_per_worker": {"CPU": t.cpus_per_worker, "GPU": gpus_per_worker}}
    return scaling, concurrent
