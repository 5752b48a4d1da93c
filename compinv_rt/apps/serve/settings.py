"""Server settings, checked before any weights load: bind address vs token, limits."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from compinv_rt.core.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    """Per-request limits; a request above one is a 400 naming the limit."""

    max_images: int = 4  # n
    max_steps: int = 100
    max_size: int = 1024  # height and width, pixels
    max_prompt_chars: int = 1000
    # n x steps x height x width: one request may not hold the worker for long (4 images of 50
    # steps at 512x512; 1024x1024 at 100 steps is over)
    max_cost: int = 4 * 50 * 512 * 512


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_batch: int = 8  # images per UNet batch (x2 with guidance)
    # How long the first item waits for company: before an idle step loop's first step (a running
    # loop admits at every step, never waiting), or before each whole batch (step_batching off).
    max_wait_ms: float = 20.0
    queue_size: int = 64  # images waiting at most; beyond: 503 + Retry-After
    timeout_s: float = 120.0  # per request, queueing included; beyond: 504
    upload_max_bytes: int = 16 << 20  # a concept upload (embeddings + artifact.json)
    body_max_bytes: int = 64 << 10  # any other request body (a generate request is < 5 kB)
    concepts_dir: Path = Path("concepts")
    limits: Limits = Limits()
    # Step-level batching: requests join the running denoise loop at every step (else whole
    # batches, formed over max_wait_ms). fixed_batch: every UNet call has 2 x max_batch rows, so an
    # image's bits never depend on its company (costs padding below saturation on CPU).
    step_batching: bool = True
    fixed_batch: bool = True

    def checked(self) -> "ServeSettings":
        for name in ("max_batch", "queue_size", "upload_max_bytes", "body_max_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.limits.max_cost < 1:
            raise ConfigError(f"--max-cost must be >= 1, got {self.limits.max_cost}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ConfigError("--max-wait-ms must be >= 0 and --timeout > 0")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1-65535, got {self.port}")
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("the token must be at least 16 characters")
        if not is_local(self.host) and not self.token:
            raise ConfigError(f"refusing to listen on {self.host} without a token: anyone who can "
                              "reach it could use the server; pass --token or --token-file, or "
                              "bind 127.0.0.1")
        return self


def is_local(host: str) -> bool:
    """True only for loopback addresses (a name is resolved; 0.0.0.0 is every interface)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def read_token(token: str | None, token_file: Path | None) -> str | None:
    if token and token_file:
        raise ConfigError("pass --token or --token-file, not both")
    if token_file is None:
        return token or None
    try:
        text = Path(token_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --token-file {token_file}: {exc}") from None
    if not text:
        raise ConfigError(f"--token-file {token_file} is empty")
    return text
