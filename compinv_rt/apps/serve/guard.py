"""ASGI middleware in front of the app: request ids and the access log, the bearer token and the
body-size limit, all before a route reads a byte of the body.

FastAPI reads and parses a body before it runs a route's dependencies, so a token check there
comes too late: an unauthenticated client could make the server buffer any body it sends. Here
an unauthorized request is answered 401 without reading its body, a declared Content-Length over
the limit 413 at once, and a chunked body is counted as it arrives (413 at the limit).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
import uuid

from starlette.exceptions import HTTPException

access_log = logging.getLogger("compinv_rt.apps.serve.access")

PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
REQUEST_ID = "x-request-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a client's own id is kept if it is this tame


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body passes its limit; an HTTPException, so FastAPI's body
    reading lets it through and the app answers it as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over this server's {limit}-byte limit")


class Guard:
    def __init__(self, app, token: str | None, body_limit: int, upload_limit: int,
                 upload_prefix: str = "/v1/concepts/"):
        self.app, self.token = app, token
        self.body_limit, self.upload_limit, self.upload_prefix = body_limit, upload_limit, upload_prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get(REQUEST_ID, "")
        rid = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        started, status, received = time.monotonic(), [0], [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        limit = self.upload_limit if (scope["method"] == "PUT" and scope["path"].startswith(
            self.upload_prefix)) else self.body_limit

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            declared = headers.get("content-length", "")
            if not self._authorized(scope["path"], headers.get("authorization", "")):
                await _json(send_with_id, 401, "missing or wrong bearer token",
                            [(b"www-authenticate", b"Bearer")])
            elif declared.isdigit() and int(declared) > limit:
                await _json(send_with_id, 413, BodyTooLarge(limit).detail)
            else:
                await self.app(scope, counted_receive, send_with_id)
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info("%s %s %s %d %.3fs in=%dB client=%s id=%s", scope["method"],
                            scope["path"], scope.get("http_version", "1.1"), status[0],
                            time.monotonic() - started, received[0], client[0], rid)

    def _authorized(self, path: str, authorization: str) -> bool:
        if self.token is None or path in PUBLIC_PATHS:
            return True
        scheme, _, credentials = authorization.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            credentials.strip().encode(), self.token.encode())


async def _json(send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
