"""`generate --jobs FILE --ray`: the same job file on a Ray cluster, one actor per worker.

Ray Data reads the pending items; `map_batches` runs `RayJobWorker`, a callable class that opens
the model and backend once per actor (with `num_gpus`: by default 1 per actor on CUDA). Outputs go to one
shared location (a folder every worker sees, or a pyarrow URI). Idempotence comes from the same
rule as the local path: each image is `<job>_<index>.png` + `.json`, the sidecar written last, and
a retried batch skips what is done; Ray Data restarts a killed actor and retries its batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict
from pathlib import Path

from compinv_rt.core.errors import CompinvError, ConfigError
from compinv_rt.generate.jobs import Item, Job, JobsConfig, JobsSummary


class RayJobWorker:
    """One per actor: loads the model and backend once, then generates whatever batches arrive."""

    def __init__(self, sink_uri: str, config: JobsConfig, threads: int):
        import torch

        from compinv_rt.generate.jobs import JobRunner
        from compinv_rt.generate.sinks import open_sink

        torch.set_num_threads(threads)
        self.runner = JobRunner(open_sink(sink_uri), config)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        items = [Item(Job(**{**json.loads(j), "concepts": tuple(json.loads(j)["concepts"])}), int(i))
                 for j, i in zip(batch["job"], batch["index"])]
        todo = [it for it in items if not self.runner.sink.exists(f"{it.name}.json")]
        summary = JobsSummary()
        self.runner.run(todo, summary)
        done = {it.name for it in todo} if not summary.problems else set()
        status = ["written" if it.name in done else "skipped" for it in items]
        return {"name": np.array([it.name for it in items]), "status": np.array(status),
                "problems": np.array([json.dumps(summary.problems)] * len(items))}


def gpus_per_actor(requested: float | None, device: str) -> float:
    """GPUs Ray reserves per actor. Default: 1 on CUDA, 0 on CPU. Ray then gives each actor its
    own GPU (CUDA_VISIBLE_DEVICES), so `cuda` inside it is that GPU. With 0 GPUs on CUDA, Ray
    would not know any actor uses a GPU: every one would land on cuda:0, so it is refused."""
    import torch

    cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if requested is None:
        requested = 1.0 if cuda else 0.0
    if requested < 0:
        raise ConfigError(f"--gpus-per-worker must be >= 0, got {requested}")
    if cuda and requested == 0:
        raise ConfigError("--gpus-per-worker 0 with a CUDA device: Ray would not know the actors "
                          "use a GPU and all of them would run on cuda:0; give a GPU share (e.g. 1 "
                          "or 0.5) or --device cpu")
    if cuda and ":" in str(device):
        raise ConfigError(f"--device {device} with --ray: Ray assigns each actor its GPU; "
                          "pass --device cuda")
    return requested


def loopback_ray() -> None:
    """Make a local Ray cluster listen on loopback only. Ray binds its ~14 ports (GCS, raylet,
    object manager, workers, proxy) to the node's address, on Linux the machine's external address
    or all interfaces; with clusters disabled (as Ray does on macOS and Windows) the node is
    127.0.0.1. Call it before Ray starts; a cluster of several machines (an address) must not."""
    import sys

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when Ray is imported
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # Ray already imported in this process: its value is taken now
        setattr(constants, "ENABLE_RAY_CLUSTER", False)  # noqa: B010 (a module of Ray's)


def run_on_ray(items: list[Item], sink_uri: str, config: JobsConfig, summary: JobsSummary,
               on_image=lambda name: None, address: str | None = None, workers: int = 2,
               gpus_per_worker: float | None = None) -> JobsSummary:
    import logging

    if address is None:
        loopback_ray()
    import ray

    for name in ("ray", "ray.data"):  # Ray's INFO lines would bury the progress bar
        logging.getLogger(name).setLevel(logging.WARNING)
    options = config.options
    if options.backend.needs_engine and options.engine is None:
        raise ConfigError("with --ray, build the engine once first (compinv-rt export) and pass "
                          "--engine DIR: every worker loads that engine and none rebuilds it")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    gpus_per_worker = gpus_per_actor(gpus_per_worker, options.device)
    if not items:
        return summary
    # Workers may run elsewhere: absolute paths.
    options = dataclasses.replace(
        options, model=os.path.abspath(options.model) if options.model else None,
        engine=None if options.engine is None else Path(options.engine).absolute())
    config = dataclasses.replace(config, options=options)
    local = address is None
    from compinv_rt.generate.jobs import KILL_AFTER_ENV

    # Workers do not inherit the driver's environment: pass on the kill tests' hook if set.
    env = {k: os.environ[k] for k in (KILL_AFTER_ENV,) if k in os.environ}
    ray.init(address=address, num_cpus=max(workers, os.cpu_count() or 1) if local else None,
             include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             configure_logging=False, runtime_env={"env_vars": env} if env else None)
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        rows = [{"job": json.dumps(asdict(it.job)), "index": it.index} for it in items]
        threads = max(1, (os.cpu_count() or 1) // workers) if local else 1
        ds = ray.data.from_items(rows).map_batches(
            RayJobWorker,
            fn_constructor_kwargs={"sink_uri": sink_uri, "config": config, "threads": threads},
            batch_size=options.max_batch,
            concurrency=workers,
            num_cpus=1,
            num_gpus=gpus_per_worker or None,
        )
        seen_problems = set()
        try:
            for row in ds.iter_rows():
                if row["status"] == "written":
                    summary.written += 1
                    on_image(row["name"])
                for p in json.loads(row["problems"]):
                    if p not in seen_problems:
                        seen_problems.add(p)
                        summary.problems.append(p)
        except Exception as exc:  # a worker's CompinvError arrives wrapped by Ray: unwrap it
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, CompinvError):
                cause = getattr(cause, "cause", None) or cause.__cause__
            if cause is not None:
                raise type(cause)(f"a Ray worker failed: {cause}") from None
            raise
    finally:
        ray.shutdown()
    return summary
