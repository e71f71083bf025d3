"""dq-serve: Triton on a repository (127.0.0.1 only), kept serving by the supervisor, with a truthful health endpoint."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from .health import HealthEndpoint
from .server import TritonServer
from .supervisor import Supervisor, SupervisorConfig


def serve(repo: Path, http_port: int = 8000, grpc_port: int = 8001, health_port: int = 8003,
          log_path: Path | None = None, timeout_s: float = 300.0, drain_s: int = 30,
          supervision: SupervisorConfig | None = None) -> None:
    """Run until Ctrl-C or SIGTERM, printing the endpoints once every model is ready; UserError when the server
    cannot be kept up (the supervisor gave up)."""
    server = TritonServer(Path(repo), http_port, grpc_port, log_path=log_path, exit_timeout_s=drain_s)
    supervisor = Supervisor(server, supervision or SupervisorConfig(start_timeout_s=timeout_s))

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    health = None
    try:
        server.start(timeout_s)
        supervisor.attach()
        health = HealthEndpoint(supervisor.health, health_port).start()
        print(f"Triton ({server.source}) serving {repo} on 127.0.0.1 only", flush=True)
        print(f"  HTTP    http://{server.http_url}   (dq-client --url {server.http_url})", flush=True)
        print(f"  gRPC    {server.grpc_url}          (dq-client --url {server.grpc_url} --protocol grpc)", flush=True)
        print(f"  health  http://127.0.0.1:{health.port}/v2/health/ready and /live   (dq-serve --probe ready "
              f"--health-port {health.port})", flush=True)
        print("backends that crash are reloaded, a server that dies is restarted; Ctrl-C to stop", flush=True)
        supervisor.run()
    except KeyboardInterrupt:
        print("stopping Triton ...", file=sys.stderr, flush=True)
    finally:
        if health is not None:
            health.stop()
        server.stop()
        signal.signal(signal.SIGTERM, old)
