"""Several replicas (or machines): the same FastAPI app on Ray Serve, one replica per device.

Each replica opens its own GenerationSession and builds the app of `create_app` with its own
batcher (dynamic batching stays per device, where the UNet batch is); Ray Serve's HTTP proxy
spreads requests over the replicas. The app is built on the replica (`__serve_build_asgi_app__`),
so the model loads there, and Ray Serve runs the app's lifespan (the batcher starts and drains).
Concept uploads reach the one replica that takes them: with several replicas, put concepts in the
shared `--concepts-dir` before starting (each replica loads them) rather than uploading.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def deployment(options, settings, replicas: int, gpus_per_replica: float, cpus_per_replica: float):
    """The bound Ray Serve application (options: SessionOptions, settings: ServeSettings)."""
    from ray import serve

    @serve.ingress()
    class CompinvReplica:
        def __init__(self, options, settings):
            self.options, self.settings = options, settings

        def __serve_build_asgi_app__(self):
            from compinv_rt.apps.serve.app import create_app
            from compinv_rt.apps.serve.engine import SessionEngine
            from compinv_rt.generate.session import GenerationSession

            session = GenerationSession.open(self.options, on_status=log.info)
            engine = SessionEngine(session, self.settings.concepts_dir, self.settings.limits)
            engine.warm_up(log.info)
            return create_app(engine, self.settings)

    return serve.deployment(
        CompinvReplica, name="compinv", num_replicas=replicas,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        max_ongoing_requests=settings.queue_size + settings.max_batch,
    ).bind(options, settings)


def run_ray_serve(options, settings, replicas: int, gpus_per_replica: float = 0.0,
                  cpus_per_replica: float = 1.0, address: str | None = None,
                  blocking: bool = True) -> None:
    """Start (or join) Ray, serve the app on settings.host:port, and block until interrupted
    (Ctrl-C or SIGTERM: Ray Serve lets the replicas finish their in-flight requests)."""
    import dataclasses
    import signal

    from compinv_rt.apps.serve.settings import is_local
    from compinv_rt.generate.scaleout import loopback_ray

    if address is None and is_local(settings.host):  # a local cluster: its ports on loopback too
        loopback_ray()
    import ray
    from ray import serve

    # Replicas run in other processes (maybe on other machines): no paths relative to this one.
    options = dataclasses.replace(options, engines_root=options.engines_root.resolve())
    settings = dataclasses.replace(settings, concepts_dir=settings.concepts_dir.resolve())
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(deployment(options, settings, replicas, gpus_per_replica, cpus_per_replica),
              name="compinv", route_prefix="/")
    if not blocking:
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # after ray.init, which sets its own
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # replicas drain their in-flight requests
        ray.shutdown()
