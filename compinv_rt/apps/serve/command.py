"""`compinv-rt serve`: the Typer command (registered in compinv_rt.apps.cli). Standard library and typer
only at import time, so `compinv-rt --help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from compinv_rt.apps.cli_support import user_errors
from compinv_rt.apps.options import BackendOption, DeviceOption, EngineOption, ModelOption, PrecisionOption
from compinv_rt.engines.registry import Backend

if TYPE_CHECKING:
    from compinv_rt.core.types import Precision
    from compinv_rt.generate.session import SessionOptions


@user_errors
def serve(  # noqa: PLR0913 (a Typer command: one parameter per option)
    model: ModelOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    backend: BackendOption = Backend.torch,
    engine: EngineOption = None,
    host: str = typer.Option("127.0.0.1", help="Address to listen on; a non-loopback one needs a token."),
    port: int = typer.Option(8000, help="TCP port."),
    token: Optional[str] = typer.Option(
        None, envvar="COMPINV_TOKEN", help="Bearer token every request must carry (except /health)."),
    token_file: Optional[Path] = typer.Option(None, help="File holding the token (not in `ps`)."),
    concepts_dir: Path = typer.Option(
        Path("concepts"), help="Served concepts: one trained concept folder per name; uploads land here."),
    max_batch: int = typer.Option(8, help="Images per UNet batch (x2 with guidance)."),
    max_wait_ms: float = typer.Option(
        20.0, help="How long the first image waits for company: on an idle step loop before its "
        "first step (a running loop admits at once, every step), else before each whole batch."),
    queue_size: int = typer.Option(64, help="Images waiting at most; beyond, 503 with Retry-After."),
    timeout: float = typer.Option(120.0, help="Per-request limit in seconds, queueing included (504)."),
    max_images: int = typer.Option(4, help="Largest n per request."),
    max_steps: int = typer.Option(100, help="Largest steps per request."),
    max_size: int = typer.Option(1024, help="Largest height/width per request."),
    max_cost: int = typer.Option(
        4 * 50 * 512 * 512, help="Largest n x steps x height x width per request (400 beyond)."),
    upload_max_bytes: int = typer.Option(16 << 20, help="Largest concept upload, bytes."),
    body_max_bytes: int = typer.Option(64 << 10, help="Largest other request body, bytes (413)."),
    step_batching: bool = typer.Option(
        True, help="Requests join the running denoise loop at every step (else whole batches)."),
    fixed_batch: bool = typer.Option(
        True, help="Pad every UNet call to 2 x max-batch rows: an image's bits never depend on "
        "what it is batched with (on CPU a smaller call is faster but rounds differently)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    ray_serve: bool = typer.Option(
        False, "--ray-serve", help="Run on Ray Serve: --replicas copies, one per device, each with "
        "its own session and batcher, behind Ray's HTTP proxy on --host/--port."),
    replicas: int = typer.Option(1, help="--ray-serve: number of replicas."),
    gpus_per_replica: float = typer.Option(0, help="--ray-serve: GPUs per replica (0 on CPU)."),
    ray_address: Optional[str] = typer.Option(None, help="--ray-serve: cluster address (default: start a local Ray)."),
):
    """Serve generation over HTTP: dynamic batching across requests, live concept uploads,
    Prometheus metrics; the API is at /docs and /openapi.json."""
    import logging

    from compinv_rt.apps.serve.settings import Limits, ServeSettings, read_token
    from compinv_rt.core.types import Precision

    # Everything cheap first: a refused bind or a bad limit costs no model load.
    settings = ServeSettings(
        host=host, port=port, token=read_token(token, token_file), max_batch=max_batch,
        max_wait_ms=max_wait_ms, queue_size=queue_size, timeout_s=timeout,
        upload_max_bytes=upload_max_bytes, body_max_bytes=body_max_bytes, concepts_dir=concepts_dir,
        step_batching=step_batching, fixed_batch=fixed_batch,
        limits=Limits(max_images=max_images, max_steps=max_steps, max_size=max_size,
                      max_cost=max_cost)).checked()
    # The access log (one line per request, with its id), uploads/deletes and skipped folders.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("compinv_rt.apps.serve").setLevel(getattr(logging, log_level.upper(), logging.DEBUG))
    options = _session_options(model, device, Precision.parse(precision), backend, engine, max_batch)
    if ray_serve:
        from compinv_rt.core.errors import ConfigError

        if replicas < 1:
            raise ConfigError(f"--replicas must be >= 1, got {replicas}")
        from compinv_rt.apps.serve.ray_serve import run_ray_serve

        typer.echo(f"Ray Serve: {replicas} replica(s) on http://{host}:{port}", err=True)
        return run_ray_serve(options, settings, replicas, gpus_per_replica, address=ray_address)

    from compinv_rt.apps.serve.app import create_app
    from compinv_rt.apps.serve.engine import SessionEngine
    from compinv_rt.apps.serve.run import serve_forever
    from compinv_rt.generate.session import GenerationSession

    status = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    session = GenerationSession.open(options, on_status=status)
    served = SessionEngine(session, concepts_dir, settings.limits, settings.fixed_batch)
    served.warm_up(status)
    status(f"serving {len(served.list_concepts())} concept(s) from {concepts_dir}/ on "
           f"http://{host}:{port} (API: /docs){'' if settings.token else ', no token'}")
    serve_forever(create_app(served, settings), host, port, log_level)


def _session_options(model: str | None, device: str, precision: Precision, backend: Backend,
                     engine: Path | None, max_batch: int) -> SessionOptions:
    """The typed options a session opens with (precision already parsed into the enum)."""
    from compinv_rt.generate.session import SessionOptions
    from compinv_rt.models.loading import inspect_model_dir, resolve_model_dir

    files = inspect_model_dir(resolve_model_dir(model))
    return SessionOptions(str(files.root), device, precision, backend, engine, max_batch=max_batch)
