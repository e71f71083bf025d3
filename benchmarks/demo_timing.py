"""README's first command as a new user runs it: a clean clone, a fresh venv, the install, then dq-demo, each timed.

The repository is cloned from its committed state (uncommitted edits are not measured). The JSON records the
commit, each stage's wall time, the demo's peak RSS and the load average before and after, because on a
shared machine the load says what the wall time means.

    python benchmarks/demo_timing.py --out benchmarks/results/demo
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from dilatequant.core.reporting import environment, write_json, write_text

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: str, cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "ab") as f:
        subprocess.run(["bash", "-c", cmd], cwd=cwd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return round(time.perf_counter() - start, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/demo"))
    p.add_argument("--keep", action="store_true", help="keep the clone (its dq-report) instead of deleting it")
    a = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="dq-demo-timing-"))
    clone, log = work / "repo", work / "log.txt"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    install_cmd, demo_cmd = ("python3 -m venv .venv && . .venv/bin/activate && pip install -q torch==2.13.0 -e .",
                             ". .venv/bin/activate && dq-demo --report dq-report")
    load_before = os.getloadavg()
    install_s = timed(install_cmd, clone, log)
    rss_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    demo_s = timed(demo_cmd, clone, log)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report = json.loads((clone / "dq-report" / "report.json").read_text())
    a.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(clone / "dq-report" / "README.md", a.out / "dq-report.md")
    write_json(a.out / "report.json", report)
    res = {"commit": commit, "command": f"{install_cmd} && dq-demo --report dq-report", "install_s": install_s,
           "demo_s": demo_s, "total_s": round(install_s + demo_s, 1),
           "demo_peak_rss_mb": round(peak_kb / 1024, 1) if peak_kb > rss_before else None,
           "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           "environment": environment()}
    write_json(a.out / "demo_timing.json", res)
    write_text(a.out / "demo_timing.md",
               f"README's first command on a clean clone of {commit[:10]}: install {install_s:.0f} s, dq-demo "
               f"{demo_s:.0f} s ({demo_s / 60:.1f} min), total {res['total_s'] / 60:.1f} min; demo peak RSS "
               f"{res['demo_peak_rss_mb']} MB; load average before {res['loadavg_before']}, after "
               f"{res['loadavg_after']}.\n")
    print(json.dumps({k: v for k, v in res.items() if k != "environment"}), flush=True)
    if not a.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
