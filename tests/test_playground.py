"""The playground page (fast, no browser): `/` serves it without a token while the API keeps its
token, its assets load with the right types, and it references nothing outside this server."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from compinv_rt.apps.serve.app import create_app
from compinv_rt.apps.serve.playground import ASSETS, STATIC_DIR, add_playground, page_paths
from compinv_rt.apps.serve.settings import ServeSettings

TOKEN = "p" * 24


class NoModelEngine:
    """Enough of ServeEngine for routes that never generate."""

    def describe(self):
        return {"model": {"path": "none", "hash": "0" * 64}, "backend": "none"}

    def plan(self, req):
        return [req.prompt], ()

    def run(self, items, should_stop):
        return [(b"\x89PNG", {"prompt": p}, len(items)) for p in items]

    def list_concepts(self):
        return []

    def add_concept(self, name, files):
        raise ValueError("no model")

    def remove_concept(self, name):
        raise KeyError(name)


def _client(token: str | None = None) -> TestClient:
    app = create_app(NoModelEngine(), ServeSettings(token=token))
    add_playground(app)  # a no-op once create_app wires it in
    return TestClient(app, base_url="http://127.0.0.1")


@pytest.mark.parametrize("token", [None, TOKEN])
def test_the_page_and_assets_need_no_token_but_the_api_does(token):
    client = _client(token)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>compinv-rt playground</title>" in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "http" not in csp
    for name, media_type in ASSETS.items():
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media_type, name
        assert r.content == (STATIC_DIR / name).read_bytes()
    assert client.head("/").status_code == 200 and client.head("/").content == b""
    if token:
        assert client.get("/v1/concepts").status_code == 401
        assert client.post("/", json={}).status_code == 401  # only GET/HEAD of the page are public
        ok = client.get("/v1/concepts", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json() == {"concepts": []}
    else:
        assert client.get("/v1/concepts").status_code == 200


def test_only_the_listed_files_are_served():
    client = _client(TOKEN)
    for path in ("/static/", "/static/../playground.py", "/static/%2e%2e/playground.py",
                 "/static/app.js.map", "/static/index.html/", "/index.html"):
        r = client.get(path)
        assert r.status_code in (401, 404), (path, r.status_code)  # not the page: the API's rules
    assert set(page_paths()) == {"/", "/static/index.html", "/static/app.js", "/static/style.css"}


def test_add_playground_twice_is_harmless():
    app = create_app(NoModelEngine(), ServeSettings())
    add_playground(app)
    add_playground(app)
    from compinv_rt.apps.serve.playground import PlaygroundPages

    assert sum(m.cls is PlaygroundPages for m in app.user_middleware) == 1


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.refs += [a[k] for k in ("src", "href", "action") if a.get(k)]
        self._in_script = tag == "script"
        assert not any(k.startswith("on") for k in a), f"inline handler on <{tag}>"  # the CSP forbids them

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag):
        self._in_script = False


def test_the_page_references_only_its_own_assets():
    html = (STATIC_DIR / "index.html").read_text()
    refs = _Refs()
    refs.feed(html)
    assert sorted(refs.refs) == ["static/app.js", "static/style.css"]
    assert refs.inline_scripts == 0
    for name in ASSETS:  # no other origin anywhere: no CDN, no fonts, no analytics
        text = (STATIC_DIR / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text and "url(" not in text, name
    js = (STATIC_DIR / "app.js").read_text()
    # every API path the page calls is relative (works behind a path prefix) and one of the API's
    assert set(re.findall(r'api\("(?:GET|PUT|POST)", [`"]([a-z0-9./]+)', js)) == {
        "openapi.json", "health", "v1/concepts", "v1/generate", "v1/concepts/"}


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (syntax check only)")
def test_the_script_parses():
    res = subprocess.run(["node", "--check", str(STATIC_DIR / "app.js")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_the_static_files_ship_with_the_package():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]["compinv_rt"]
    assert "apps/serve/static/*" in data
