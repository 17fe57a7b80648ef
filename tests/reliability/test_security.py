"""Security checks kept as tests: XSRF on for uploads against the real server, no file outside
the model folders ever opened (symlinks, `..`), no user-typed URL ever fetched."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import pytest

from backend.analyses import AnalysisRequest
from backend.errors import AtlasError
from backend.service import AtlasService
from tests.conftest import REPO_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`streamlit run app.py` with the repository's .streamlit/config.toml, on a fresh cache."""
    port = _free_port()
    env = {**os.environ, "ATLAS_CACHE_DIR": str(tmp_path_factory.mktemp("server-cache"))}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py",
                             "--server.port", str(port), "--server.address", "127.0.0.1"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{base}/_stcore/health", timeout=5) as response:
                cookie = response.headers.get("Set-Cookie", "")
                break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.5)
    yield base, cookie
    proc.terminate()
    proc.wait(30)


def _upload(base: str, headers: dict[str, str]) -> int:
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"problem.json\"\r\n"
            b"Content-Type: application/json\r\n\r\n{}\r\n--b--\r\n")
    request = urllib.request.Request(
        f"{base}/_stcore/upload_file/some-session/some-file", data=body, method="PUT",
        headers={"Content-Type": "multipart/form-data; boundary=b", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_an_upload_without_the_xsrf_token_is_refused(server):
    base, cookie = server
    assert "_streamlit_xsrf" in cookie  # the server hands out a token: XSRF is on
    assert _upload(base, {}) == 403
    assert _upload(base, {"Cookie": cookie.split(";")[0]}) == 403  # cookie alone: no header
    # Control: with the token in both places the XSRF check passes and the request is refused
    # for the next reason instead (this session does not exist).
    token = cookie.split(";")[0].split("=", 1)[1]
    assert _upload(base, {"Cookie": cookie.split(";")[0], "X-Xsrftoken": token}) == 400


class OpenedFiles:
    """Every path the process opens (Python's audit events), while active."""

    def __init__(self):
        self.paths: list[str] = []
        self.connections: list[object] = []
        self.active = False
        sys.addaudithook(self._hook)  # hooks cannot be removed: this one is switched off

    def _hook(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.fsdecode(args[0]))
        elif event in ("socket.connect", "urllib.Request"):
            self.connections.append(args)


@pytest.fixture(scope="module")
def watch():
    return OpenedFiles()


@pytest.fixture
def guarded(tmp_path, settings):
    """A service whose only model folder is models/, next to a secret outside it, with links
    and `..` paths that point at the secret."""
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    secret_model = outside / "secret-model"
    secret_model.mkdir()
    (secret_model / "config.json").write_text('{"model_type": "llama"}')
    (outside / "secret.gguf").write_bytes(b"GGUF secret")
    (models / "link-to-folder").symlink_to(secret_model)
    (models / "link.gguf").symlink_to(outside / "secret.gguf")
    (models / "sub").mkdir()
    svc = AtlasService(replace(settings, model_dirs=(models.resolve(),),
                               cache_dir=tmp_path / "cache"))
    yield svc, outside
    svc.worker.shutdown()
    svc.store.close()


ESCAPES = ["./link-to-folder", "link.gguf", "../outside/secret-model", "sub/../../outside/secret.gguf",
           "{outside}/secret-model", "{outside}/secret.gguf", "{outside}/../outside/secret.gguf",
           "~/../../{outside}/secret-model", "/etc/passwd", "../../../../etc/hostname"]


@pytest.mark.parametrize("ref", ESCAPES)
def test_no_file_outside_the_model_folders_is_opened(guarded, watch, ref):
    svc, outside = guarded
    ref = ref.format(outside=outside)
    watch.paths.clear()
    watch.active = True
    try:
        with pytest.raises(AtlasError, match="model folders"):
            svc.submit(AnalysisRequest.make("attention", ref, "A text."))
    finally:
        watch.active = False
    touched = [p for p in watch.paths
               if str(outside) in os.path.realpath(p) or p.startswith("/etc")]
    assert touched == []


class CountingHandler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 (the standard library's name)
        CountingHandler.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"model_type": "llama"}')

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def listener():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize("form", ["http://{h}/model", "https://{h}/model.gguf", "{h}/model",
                                  "http://{h}/org/model/resolve/main/config.json",
                                  "file:///etc/passwd", "//{h}/share/model", "hf://{h}/model",
                                  "ftp://{h}/model.gguf"])
def test_no_user_typed_url_is_fetched(service, watch, listener, form):
    ref = form.format(h=listener)
    CountingHandler.hits.clear()
    watch.connections.clear()
    watch.active = True
    try:
        with pytest.raises(AtlasError):
            service.submit(AnalysisRequest.make("attention", ref, "A text."))
    finally:
        watch.active = False
    time.sleep(0.1)
    assert CountingHandler.hits == [] and watch.connections == []
