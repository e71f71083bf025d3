"""TensorRT for RTX: NVIDIA's parser and builder on any machine, GPU or not (CPU-only ahead-of-time builds).

TensorRT-RTX (`pip install "dilatequant[rtx]"`, module `tensorrt_rtx`) builds a plan without a GPU for the compute
capabilities it is told (7.5 to 12.1, consumer and workstation GPUs; its default: 8.6, 8.9, 12.0); kernels are
compiled on the GPU that first runs it. Its parser and builder are the ones a deployment uses, so a build here
checks what a rules checker can only guess: that every node imports, that the quantized types meet, that the
optimization profile fits the network.

Builds run in a child process (rtx_child.py): one build for dq-build-engine, many in a row for the planted-defect
corpus. The parent learns per build whether the graph parsed, whether it built, the errors TensorRT-RTX logged,
and, when the child died (a segmentation fault in the builder) or stalled, which build it was on: `run_jobs` never
raises for what the builder does, `build_with_tensorrt_rtx` turns it into one line.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType

from ...core.errors import UserError
from .env import GpuInfo
from .polygraphy_build import build_error_message, key_errors
from .targets import RTX_DEFAULT_TARGETS, ComputeCapability, format_cc

RTX_INSTALL_HINT = 'pip install "dilatequant[rtx]" (TensorRT-RTX: builds plans without a GPU)'
RTX_MIN = (1, 7)
POLL_S = 0.05


def require_tensorrt_rtx() -> ModuleType:
    """Import TensorRT-RTX >= 1.7, or one line naming the install command."""
    try:
        import tensorrt_rtx as trt
    except (ImportError, OSError) as err:
        raise UserError(f"TensorRT-RTX is not installed ({err}); install it with: {RTX_INSTALL_HINT}") from err
    version = str(getattr(trt, "__version__", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < RTX_MIN:
        raise UserError(f"TensorRT-RTX {version} is installed, but dilatequant builds with TensorRT-RTX >= "
                        f"{'.'.join(map(str, RTX_MIN))}; upgrade: pip install -U \"tensorrt-rtx>=1.7,<2\"")
    return trt


def supported_targets(trt: ModuleType) -> tuple[ComputeCapability, ...]:
    """The compute capabilities this TensorRT-RTX builds for (its ComputeCapability enum: SM75 ... SM121)."""
    names = [n for n in trt.ComputeCapability.__members__ if n.startswith("SM") and n[2:].isdigit()]
    return tuple(sorted((int(n[2:-1]), int(n[-1])) for n in names))


@dataclass
class RtxJob:
    """One parse + build. `profile` is {input: {"min", "opt", "max"}} (None: Polygraphy's default for dynamic
    inputs); `compute_capabilities` None builds for TensorRT-RTX's default set; `plan` None keeps no plan."""
    onnx: Path
    plan: Path | None = None
    profile: dict | None = None
    compute_capabilities: tuple[ComputeCapability, ...] | None = None
    opt_level: int | None = None
    workspace_bytes: int | None = None

    def to_json(self, index: int) -> dict:
        return {"index": index, "onnx": str(self.onnx), "plan": str(self.plan) if self.plan else None,
                "profile": self.profile, "opt_level": self.opt_level, "workspace_bytes": self.workspace_bytes,
                "compute_capabilities": [list(c) for c in self.compute_capabilities]
                if self.compute_capabilities else None}


@dataclass
class RtxOutcome:
    """What TensorRT-RTX did with one job."""
    parsed: bool = False
    built: bool = False
    errors: list[str] = field(default_factory=list)
    crash: str | None = None            # the signal that ended the child ("SIGSEGV"), or "exit N"
    timed_out: bool = False
    wall_s: float = 0.0                 # this job, in the child (or until it died)
    details: dict = field(default_factory=dict)  # versions, build_s, plan_bytes, network, settings

    @property
    def verdict(self) -> str:
        if self.timed_out:
            return "timed out"
        if self.crash:
            return f"crashed ({self.crash})"
        if not self.parsed:
            return "parser refused"
        return "built" if self.built else "builder refused"

    @property
    def reason(self) -> str:
        """The first error that says what is wrong ("" when it built)."""
        return next(iter(key_errors(self.errors)), "") if not self.built else ""

    def to_json(self) -> dict:
        return asdict(self) | {"verdict": self.verdict, "reason": self.reason}


def child_env() -> dict[str, str]:
    """The child's environment: Polygraphy on TensorRT-RTX, and this very dilatequant importable."""
    import dilatequant

    root = str(Path(dilatequant.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, POLYGRAPHY_USE_TENSORRT_RTX="1", PYTHONPATH=path)


def run_jobs(jobs: list[RtxJob], timeout_s: float | None = None, quiet: bool = True) -> list[RtxOutcome]:
    """Run `jobs` in as few child processes as crashes allow: a child that dies (or spends `timeout_s` on one
    job) is recorded against the job it was on, and a new child takes the rest. `quiet` keeps the children's
    logs out of the terminal (they go to a temporary file; a crash's last lines are kept in its outcome)."""
    outcomes: dict[int, RtxOutcome] = {}
    with tempfile.TemporaryDirectory(prefix="dq-rtx-") as tmp:
        for round_ in range(1, len(jobs) + 1):
            pending = [i for i in range(len(jobs)) if i not in outcomes]
            if not pending:
                break
            child = _Child(Path(tmp) / str(round_), [jobs[i].to_json(i) for i in pending], quiet)
            outcomes.update(child.follow(timeout_s))
            left = [i for i in pending if i not in outcomes]
            if left and child.current is None and child.proc.returncode:  # died between jobs (or starting up)
                child.current = left[0]
            if child.current is not None:
                outcomes[child.current] = child.stopped_outcome()
            elif left:  # exited cleanly without reaching them: a bug, not a crash
                raise RuntimeError(f"the TensorRT-RTX child exited ({child.proc.returncode}) with jobs left: "
                                   f"{child.log_tail()}")
    return [outcomes[i] for i in range(len(jobs))]


class _Child:
    """One rtx_child process working through a list of jobs, followed through its results file."""

    def __init__(self, folder: Path, jobs: list[dict], quiet: bool) -> None:
        folder.mkdir()
        self.results, self.log = folder / "results.jsonl", folder / "log.txt"
        (folder / "jobs.json").write_text(json.dumps(jobs))
        self.results.touch()
        self.current: int | None = None
        self.started: dict[int, float] = {}
        self.timed_out = False
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dilatequant.engines.tensorrt.rtx_child", str(folder / "jobs.json"),
                 str(self.results)], env=child_env(), stdout=log if quiet else None,
                stderr=subprocess.STDOUT if quiet else None)

    def follow(self, timeout_s: float | None) -> dict[int, RtxOutcome]:
        """Outcomes as the child reports them, until it exits (or is killed for spending timeout_s on one job)."""
        done: dict[int, RtxOutcome] = {}
        read = 0
        while True:
            exited = self.proc.poll() is not None
            lines = self.results.read_text().splitlines()
            for line in lines[read:]:
                if not line.endswith("}"):
                    break  # still being written: read it next time
                read += 1
                msg = json.loads(line)
                if "start" in msg:
                    self.current = msg["start"]
                    self.started[self.current] = time.perf_counter()
                    continue
                i = msg.pop("index")
                done[i] = RtxOutcome(parsed=msg.pop("parsed"), built=msg.pop("built"), errors=msg.pop("errors"),
                                     wall_s=self._elapsed(i), details=msg)
                self.current = None
            if exited:
                return done
            if timeout_s and self.current is not None and self._elapsed(self.current) > timeout_s:
                self.proc.kill()
                self.proc.wait()
                self.timed_out = True
                return done
            time.sleep(POLL_S)

    def _elapsed(self, i: int) -> float:
        return round(time.perf_counter() - self.started.get(i, time.perf_counter()), 2)

    def stopped_outcome(self) -> RtxOutcome:
        """The outcome of the job the child was on when it died or was stopped."""
        code = self.proc.returncode
        crash = None if self.timed_out else (signal.Signals(-code).name if code < 0 else f"exit {code}")
        return RtxOutcome(crash=crash, timed_out=self.timed_out, errors=self.log_tail(),
                          wall_s=self._elapsed(self.current))

    def log_tail(self, lines: int = 3) -> list[str]:
        return self.log.read_text(errors="replace").strip().splitlines()[-lines:] if self.log.is_file() else []


@dataclass
class RtxBuildResult:
    version: str
    build_s: float
    engine_bytes: int
    engine_sha256: str
    settings: dict | None
    network: dict | None
    onnx_parser: int | None


def build_with_tensorrt_rtx(job: RtxJob, engine: Path, rules_verdict: str) -> RtxBuildResult:
    """`job` (its plan left unset) built CPU-only in a child process; the plan is renamed to `engine` only when the
    child succeeded.

    A parser or builder error is one line with TensorRT-RTX's first errors; a child that died is one line naming
    the signal, the graph and the rules check's verdict (`rules_verdict`)."""
    from ...calibrate.checkpoint import checkpoint_hash as sha256_file
    from ...core.reporting import ensure_writable_dir, publish

    ensure_writable_dir(engine.parent)
    fd, tmp = tempfile.mkstemp(dir=engine.parent, prefix=f".{engine.name}.", suffix=".building")
    os.close(fd)
    tmp = Path(tmp)
    onnx_path = job.onnx
    try:
        (outcome,) = run_jobs([replace(job, plan=tmp)], quiet=False)
        if outcome.crash:
            raise UserError(f"TensorRT-RTX's builder died ({_signal_words(outcome.crash)}) while building "
                            f"'{onnx_path}', a graph the TensorRT rules check {rules_verdict}; no plan was written. "
                            "Report it with the graph (dq-export --check passes it, so the crash is TensorRT-RTX's)")
        if not outcome.built:
            raise UserError(build_error_message(onnx_path, key_errors(outcome.errors), None, limit=2,
                                                builder="TensorRT-RTX"))
        publish(tmp, engine)
    finally:
        tmp.unlink(missing_ok=True)
    d = outcome.details
    return RtxBuildResult(d["tensorrt_rtx"], d.get("build_s", outcome.wall_s), engine.stat().st_size,
                          sha256_file(engine), d.get("settings"), d.get("network"), d.get("onnx_parser"))


def _signal_words(crash: str) -> str:
    """'SIGSEGV' -> 'signal SIGSEGV, a segmentation fault'; 'SIGKILL' says memory may have run out."""
    extra = {"SIGSEGV": ", a segmentation fault", "SIGKILL": ", killed: out of memory?", "SIGABRT": ", an abort"}
    return crash if crash.startswith("exit") else f"signal {crash}{extra.get(crash, '')}"


def plan_refusal(plan: Path, sidecar: dict, gpu: GpuInfo | None) -> str:
    """Why a TensorRT-RTX plan cannot run here, in one line: it needs a GPU of one of its target compute
    capabilities, and TensorRT-RTX's runtime, which dilatequant's runners do not drive (they run TensorRT 11 plans).
    """
    named = (sidecar.get("targets") or {}).get("compute_capabilities")
    default = "TensorRT-RTX's default set, " + ", ".join(map(format_cc, RTX_DEFAULT_TARGETS))
    targets = ", ".join(named) if named else default
    what = (f"engine '{plan}' is a TensorRT-RTX {sidecar.get('tensorrt_rtx') or ''} plan, built without a GPU for "
            f"compute capabilities {targets}").replace("  ", " ")
    if gpu is None:
        return (f"{what}: running it takes an NVIDIA GPU of one of those and there is none here; check the graph it "
                f"was built from on the CPU with dq-verify --onnx {sidecar.get('built_onnx') or 'unet.onnx'}")
    if named and gpu.compute_capability not in named:
        return (f"{what}, and this GPU ({gpu.name}) is compute capability {gpu.compute_capability}; build a plan for "
                "it with dq-build-engine --backend tensorrt on this machine")
    return (f"{what}; dilatequant runs TensorRT 11 plans and has no TensorRT-RTX runtime: build one for this GPU "
            f"({gpu.name}) with dq-build-engine --backend tensorrt")
