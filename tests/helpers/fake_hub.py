"""A loopback HTTP server answering the Hub endpoints huggingface_hub uses to authenticate, create a
repository and commit files, recording everything that arrives."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKENS = {"hf_writer_secret_123": "write", "hf_reader_secret_456": "read"}


class FakeHub:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files": {path: bytes}}
        self.repos: list[dict] = []
        self.fail_commits = 0  # answer this many commits with HTTP 500 first
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _reply(self, status: int, payload: dict | None = None) -> None:
                body = json.dumps(payload or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _role(self) -> str | None:
                auth = self.headers.get("Authorization", "")
                return TOKENS.get(auth.removeprefix("Bearer "))

            def do_GET(self):
                hub.requests.append(("GET", self.path, dict(self.headers), b""))
                if self.path.startswith("/api/whoami-v2"):
                    role = self._role()
                    if role is None:
                        return self._reply(401, {"error": "Invalid credentials"})
                    return self._reply(200, {"name": "me", "orgs": [], "auth": {"accessToken": {"role": role}}})
                return self._reply(404, {"error": f"not found: {self.path}"})

            def do_POST(self):
                body = self._body()
                hub.requests.append(("POST", self.path, dict(self.headers), body))
                path = self.path.split("?")[0]
                if self._role() != "write":
                    return self._reply(401, {"error": "Invalid credentials"})
                if path == "/api/repos/create":
                    hub.repos.append(json.loads(body))
                    payload = json.loads(body)
                    return self._reply(
                        200, {"url": f"{hub.url}/{payload.get('organization') or 'me'}/{payload['name']}"}
                    )
                if path == "/api/validate-yaml":
                    return self._reply(200, {})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._reply(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                if "/commit/" in path:
                    if hub.fail_commits > 0:
                        hub.fail_commits -= 1
                        return self._reply(500, {"error": "internal error"})
                    repo, revision = path.removeprefix("/api/models/").split("/commit/")
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    files = {
                        line["value"]["path"]: base64.b64decode(line["value"]["content"])
                        for line in lines
                        if line["key"] == "file"
                    }
                    summary = next(line["value"].get("summary") for line in lines if line["key"] == "header")
                    hub.commits.append({"repo": repo, "revision": revision, "summary": summary, "files": files})
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
                if "/branch/" in path:
                    return self._reply(200, {})
                return self._reply(404, {"error": f"not found: {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
