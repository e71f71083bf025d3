"""dq-serve's health endpoint on 127.0.0.1 (Triton's paths, truthful answers), and the probe that reads it.

    GET /v2/health/live         200 while tritonserver answers, or dq-serve is restarting it; else 503
    GET /v2/health/ready        200 when every model can serve (its backend processes alive, Triton has it READY,
                                and every model it calls is ready); else 503. The JSON body names each model's
                                reason.
    GET /v2/models/<name>/ready the same for one model (404 for a model the repository does not have)

An orchestrator points its readiness and liveness checks here (or runs `dq-serve --probe ready|live`, which exits
0 or 1 with one line: an exec probe, for orchestrators whose HTTP checks cannot reach 127.0.0.1).
"""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .server import LOCALHOST

PROBES = ("live", "ready")


class HealthEndpoint:
    def __init__(self, health, port: int, host: str = LOCALHOST) -> None:
        """`health()` -> the supervisor's snapshot (Supervisor.health)."""
        handler = type("Handler", (_Handler,), {"health": staticmethod(health)})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dq-serve-health", daemon=True)

    def start(self) -> "HealthEndpoint":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    health = None  # set per endpoint

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0].rstrip("/")
        h = self.health()
        if path == "/v2/health/live":
            self._answer(200 if h["live"] else 503, {"live": h["live"]})
        elif path == "/v2/health/ready":
            self._answer(200 if h["ready"] else 503, h)
        elif path.startswith("/v2/models/") and path.endswith("/ready"):
            name = path[len("/v2/models/"):-len("/ready")]
            model = h["models"].get(name)
            if model is None:
                self._answer(404, {"error": f"no model '{name}' in this repository"})
            else:
                self._answer(200 if model["ready"] and h["live"] else 503, {"name": name, **model})
        else:
            self._answer(404, {"error": "GET /v2/health/live, /v2/health/ready or /v2/models/<name>/ready"})

    def _answer(self, code: int, body: dict) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # probes every few seconds would flood the terminal
        pass


def probe(port: int, what: str, timeout_s: float = 5.0, host: str = LOCALHOST) -> tuple[bool, str]:
    """(healthy, one line saying why) from dq-serve's health endpoint."""
    url = f"http://{host}:{port}/v2/health/{what}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            code, body = r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as err:
        code, body = err.code, json.loads(err.read() or b"{}")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return False, f"not {what}: nothing answers at {url} ({reason}); is dq-serve running with --health-port {port}?"
    if what == "live":
        return code == 200, "live" if code == 200 else "not live: tritonserver does not answer and is not restarting"
    models = body.get("models", {})
    if code == 200:
        return True, f"ready: {len(models)} models ({', '.join(sorted(models))})"
    down = [f"{n}: {m.get('reason', 'not ready')}" for n, m in sorted(models.items()) if not m.get("ready")]
    return False, "not ready: " + ("; ".join(down) or ("not live" if not body.get("live") else "unknown"))
