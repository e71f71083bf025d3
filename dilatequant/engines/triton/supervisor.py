"""dq-serve's watchdog: keeps every model of the repository serving, and says truthfully whether it does.

Triton 2.51 (the server bundled in nvidia-pytriton) neither restarts a Python-backend process that died nor reports
it: the model and the server stay "ready" while every request to the model fails (docs/triton.md, "What Triton
itself provides"). So the supervisor watches the stub processes and the server itself, every `poll_s`:
- a stub died: its model is unloaded (Triton's own readiness turns false at once; direct requests get "no available
  versions" at once instead of a wait on the dead process) and loaded again, both over Triton's model-control API
  (the server runs with --model-control-mode explicit). A plain load of the unchanged model would be a no-op that
  keeps the dead instance; a load with a changed config builds new instances beside the old ones, but Triton 2.51
  then never finishes unloading the old version. So every instance of the model is replaced, the survivors too.
  Triton 2.51 may not finish even this unload (a version with a dead stub can stay "unloading"), which leaves the
  surviving instances' processes running, unused: they are stopped (SIGKILL) once they have had the drain timeout
  (--drain-timeout) to finish the requests they held;
- tritonserver exited, or has not answered its live endpoint for `unresponsive_s`, a reload failed, or one model
  failed more than `max_faults` times in `window_s`: the server is restarted on the same ports;
- more than `max_restarts` restarts in `window_s`: it gives up (UserError), so dq-serve exits and the orchestrator
  restarts the container.
Each fault is logged in one line when found and one when recovered. `health()` answers at once, without asking
Triton (which may be busy loading a model): readiness from the stubs' state at that moment, the recovery in
progress, Triton's model states as of the last poll and the models' dependencies (a pipeline is ready only when
every model it calls is); liveness from the watchdog's own heartbeat (a recovery in progress counts as alive for
as long as a server start may take).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ...core.errors import UserError
from .server import TritonServer
from .stubs import alive, stubs_of


def log_line(kind: str, message: str) -> None:
    stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    print(f"dq-serve {stamp} {kind}: {message}", file=sys.stderr, flush=True)


@dataclass
class SupervisorConfig:
    poll_s: float = 0.5
    max_faults: int = 3          # faults of one model within window_s before the server is restarted instead
    max_restarts: int = 3        # server restarts within window_s before giving up
    window_s: float = 600.0
    unresponsive_s: float = 30.0
    start_timeout_s: float = 300.0


@dataclass
class ModelWatch:
    name: str
    depends_on: tuple[str, ...]
    stubs: dict[int, str] = field(default_factory=dict)  # pid -> instance, recorded at the last (re)load
    leftovers: dict[int, float] = field(default_factory=dict)  # old instances' pids -> when to stop them
    recovering: str | None = None
    fault_times: list[float] = field(default_factory=list)


class Supervisor:
    def __init__(self, server: TritonServer, config: SupervisorConfig | None = None, log=log_line) -> None:
        self.server, self.config, self.log = server, config or SupervisorConfig(), log
        self.models: dict[str, ModelWatch] = {}
        self.lock = threading.RLock()
        self.restarting: str | None = None
        self.restart_times: list[float] = []
        self.faults = self.recoveries = 0
        self._last_live = self._beat = time.monotonic()
        self._busy_since: float | None = None  # a recovery or restart in progress since
        self._states: dict[str, str] = {}      # Triton's model states at the last poll

    # --- Triton over HTTP ---------------------------------------------------------------------------------------
    def _client(self, timeout_s: float = 5.0):
        import tritonclient.http as http

        return http.InferenceServerClient(self.server.http_url, connection_timeout=timeout_s, network_timeout=timeout_s)

    def _triton_live(self) -> bool:
        try:
            c = self._client(2.0)
            try:
                return bool(c.is_server_live())
            finally:
                c.close()
        except Exception:  # refused, timed out, a server answering garbage: not live
            return False

    def _model_states(self) -> dict[str, str]:
        try:
            c = self._client(2.0)
            try:
                return {m["name"]: m.get("state", "") for m in c.get_model_repository_index()}
            finally:
                c.close()
        except Exception:
            return {}

    # --- watching -----------------------------------------------------------------------------------------------
    def attach(self) -> "Supervisor":
        """Learn the models (from the running server), what each calls (config parameters `*_model` naming another
        model, as our pipelines have), and their stub processes."""
        c = self._client(30.0)
        try:
            names = [m["name"] for m in c.get_model_repository_index()]
            models = {}
            for name in names:
                params = c.get_model_config(name).get("parameters", {})
                deps = {v.get("string_value") for k, v in params.items() if k.endswith("_model")}
                models[name] = ModelWatch(name, tuple(sorted(d for d in deps if d in names and d != name)))
        finally:
            c.close()
        stubs = stubs_of(self.server.process.pid)
        for m in models.values():
            m.stubs = {s.pid: s.instance for s in stubs if s.model == m.name}
        with self.lock:
            self.models = models
            self._states = {name: "READY" for name in names}  # the server was ready when attached
        self._last_live = self._beat = time.monotonic()
        return self

    def poll_once(self) -> None:
        p = self.server.process
        if p is None or p.poll() is not None:
            self._restart(f"tritonserver exited with code {None if p is None else p.returncode}")
            return
        if self._triton_live():
            self._last_live = time.monotonic()
            states = self._model_states()
            with self.lock:
                self._states = states
        elif time.monotonic() - self._last_live > self.config.unresponsive_s:
            self._restart(f"tritonserver has not answered /v2/health/live for {self.config.unresponsive_s:g} s")
            return
        for m in list(self.models.values()):
            dead = {pid: inst for pid, inst in m.stubs.items() if not alive(pid)}
            if dead:
                self._recover_model(m, dead)
            self._stop_leftovers(m)
        self._beat = time.monotonic()

    def run(self, stop: threading.Event | None = None) -> None:
        """Poll until `stop` is set (or forever); UserError when it gives up."""
        stop = stop or threading.Event()
        while not stop.wait(self.config.poll_s):
            self.poll_once()

    # --- recovering ---------------------------------------------------------------------------------------------
    def _fault(self, message: str) -> None:
        self.faults += 1
        self.log("fault", message)

    def _recovered(self, message: str) -> None:
        self.recoveries += 1
        self.log("recovered", message)

    def _recover_model(self, m: ModelWatch, dead: dict[int, str]) -> None:
        now = time.monotonic()
        m.fault_times = [t for t in m.fault_times if now - t < self.config.window_s] + [now]
        what = ", ".join(f"{inst} (pid {pid})" for pid, inst in sorted(dead.items()))
        self._fault(f"model '{m.name}': backend process {what} exited; unloading it and loading it again")
        if len(m.fault_times) > self.config.max_faults:
            self._restart(f"model '{m.name}' failed {len(m.fault_times)} times in {self.config.window_s:g} s")
            return
        with self.lock:
            m.recovering = f"backend process {what} exited"
            self._busy_since = now
        old = set(m.stubs)
        try:
            c = self._client(self.config.start_timeout_s)
            try:
                c.unload_model(m.name)
                c.load_model(m.name)
            finally:
                c.close()
        except Exception as err:  # a model that no longer loads: only a restart (or giving up) is left
            self._restart(f"reloading model '{m.name}' failed ({type(err).__name__}: {err})")
            return
        stubs = {s.pid: s.instance for s in stubs_of(self.server.process.pid) if s.model == m.name}
        left = {pid: inst for pid, inst in m.stubs.items() if pid in stubs}
        with self.lock:
            m.stubs = {pid: inst for pid, inst in stubs.items() if pid not in old}
            m.recovering = self._busy_since = None
        m.leftovers.update({pid: time.monotonic() + self.server.exit_timeout_s for pid in left})
        note = (f"; the old instance process {', '.join(f'{i} (pid {p})' for p, i in sorted(left.items()))} that "
                f"Triton did not stop is stopped in {self.server.exit_timeout_s} s" if left else "")
        self._recovered(f"model '{m.name}' serving again {time.monotonic() - now:.1f} s after the fault "
                        f"(instances {', '.join(sorted(m.stubs.values())) or 'none'}){note}")

    def _stop_leftovers(self, m: ModelWatch) -> None:
        due = [pid for pid, when in m.leftovers.items() if time.monotonic() >= when or not alive(pid)]
        if not due:
            return
        still = {s.pid for s in stubs_of(self.server.process.pid) if s.model == m.name}  # not a reused pid
        for pid in due:
            del m.leftovers[pid]
            if pid in still:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _restart(self, why: str) -> None:
        while True:
            now = time.monotonic()
            self.restart_times = [t for t in self.restart_times if now - t < self.config.window_s] + [now]
            n = len(self.restart_times)
            if n > self.config.max_restarts:
                self._fault(f"{why}; {n - 1} restarts in the last {self.config.window_s:g} s already: giving up")
                raise UserError(f"{why}, after {n - 1} restarts of tritonserver in {self.config.window_s:g} s; "
                                "dq-serve gives up (see the server log: dq-serve --log FILE)")
            self._fault(f"{why}; restarting tritonserver (restart {n} of at most {self.config.max_restarts} in "
                        f"{self.config.window_s:g} s)")
            with self.lock:
                self.restarting, self._busy_since = why, now
            try:
                self.server.stop()
                self.server.start(self.config.start_timeout_s)
                self.attach()
            except UserError as err:
                why = f"tritonserver did not come back ({err})"
                continue
            with self.lock:
                self.restarting = self._busy_since = None
            self._recovered(f"tritonserver restarted, every model ready {time.monotonic() - now:.1f} s after the "
                            "fault")
            return

    # --- health -------------------------------------------------------------------------------------------------
    def health(self) -> dict:
        """{"live", "ready", "models": {name: {"ready", "reason"?}}, "faults", "recoveries", "restarts"}, now."""
        now = time.monotonic()
        with self.lock:
            restarting, busy_since, states = self.restarting, self._busy_since, dict(self._states)
            models = {n: (m.depends_on, dict(m.stubs), m.recovering) for n, m in self.models.items()}
        p = self.server.process
        running = p is not None and p.poll() is None
        live = (now - self._beat < max(10.0, 4 * self.config.poll_s) or
                busy_since is not None and now - busy_since < self.config.start_timeout_s + 30)
        soon = f"recovery starts within {self.config.poll_s:g} s"
        reasons: dict[str, str | None] = {}
        for name, (_, stubs, recovering) in models.items():
            dead = [inst for pid, inst in stubs.items() if not alive(pid)]
            reasons[name] = (f"tritonserver restarting ({restarting})" if restarting else
                             f"tritonserver exited; {soon}" if not running else
                             f"recovering: {recovering}" if recovering else
                             f"backend process {', '.join(sorted(dead))} exited; {soon}" if dead else
                             None if states.get(name) == "READY" else
                             f"Triton reports it {states.get(name) or 'unknown'}")
        changed = True
        while changed:  # a model is ready only when every model it calls is
            changed = False
            for name, (deps, _, _) in models.items():
                down = [d for d in deps if reasons.get(d)]
                if reasons[name] is None and down:
                    reasons[name] = f"calls {', '.join(down)}, not ready"
                    changed = True
        ready = live and not restarting and running and all(r is None for r in reasons.values())
        return {"live": live, "ready": ready,
                "models": {n: {"ready": r is None, **({"reason": r} if r else {})} for n, r in reasons.items()},
                "faults": self.faults, "recoveries": self.recoveries, "restarts": len(self.restart_times)}
