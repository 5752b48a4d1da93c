"""Running the app on uvicorn: in the foreground (the CLI) or on a thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

GRACEFUL_SHUTDOWN_S = 60  # in-flight requests get this long to finish after SIGTERM / Ctrl-C


def uvicorn_config(app, host: str, port: int, log_level: str = "info"):
    import uvicorn

    # One process, one event loop: the engine is one model on one device; more replicas are Ray
    # Serve's job (see the README), not uvicorn workers that would each load the model.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, workers=1,
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=False)


def serve_forever(app, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.Server(uvicorn_config(app, host, port, log_level)).run()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn on a background thread, on 127.0.0.1 and a free port; `stop()` is a graceful
    shutdown (what SIGTERM does)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn_config(app, host, port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn")

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
