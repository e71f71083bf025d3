"""README's two commands as a new user runs them: a clean clone, a fresh venv, the install, then dq-demo, each
timed; with --tests, README's second command (the test extras and the suite) in a second clean clone.

The repository is cloned from its committed state (uncommitted edits are not measured), and the commands are read
from README's first code block, so what is timed is what README says. The JSON records the commit, each stage's
wall time, the demo's peak RSS, the suite's summary line and the load average before and after, because on a
shared machine the load says what the wall time means.

    python benchmarks/demo_timing.py --out benchmarks/results/demo --tests
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from dilatequant.core.reporting import environment, write_json, write_text

REPO = Path(__file__).resolve().parents[1]


def run_timed(cmd: str, cwd: Path, log: Path) -> tuple[float, int]:
    """cmd in bash, its output appended to log: (wall seconds, exit status)."""
    start = time.perf_counter()
    with open(log, "ab") as f:
        rc = subprocess.run(["bash", "-c", cmd], cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    return round(time.perf_counter() - start, 1), rc


def timed(cmd: str, cwd: Path, log: Path) -> float:
    wall, rc = run_timed(cmd, cwd, log)
    if rc:
        raise SystemExit(f"error: `{cmd}` exited {rc}; its output is in {log}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/demo"))
    p.add_argument("--keep", action="store_true", help="keep the clone (its dq-report) instead of deleting it")
    p.add_argument("--tests", action="store_true", help="also time README's second command in a clean clone")
    a = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="dq-demo-timing-"))
    clone, log = work / "repo", work / "log.txt"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    first, second = readme_commands(clone / "README.md")
    install_cmd, demo_cmd = first.rsplit(" && ", 1)  # "... && dq-demo --report dq-report"
    demo_cmd = f". .venv/bin/activate && {demo_cmd}"
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
    if a.tests:
        res["tests"] = time_tests(second, work)
    write_json(a.out / "demo_timing.json", res)
    write_text(a.out / "demo_timing.md",
               f"README's first command on a clean clone of {commit[:10]}: install {install_s:.0f} s, dq-demo "
               f"{demo_s:.0f} s ({demo_s / 60:.1f} min), total {res['total_s'] / 60:.1f} min; demo peak RSS "
               f"{res['demo_peak_rss_mb']} MB; load average before {res['loadavg_before']}, after "
               f"{res['loadavg_after']}.\n" + (tests_line(res["tests"]) if a.tests else ""))
    print(json.dumps({k: v for k, v in res.items() if k != "environment"}), flush=True)
    if a.keep or res.get("tests", {}).get("exit"):
        print(f"kept {work} (the clones and their logs)", flush=True)
    else:
        shutil.rmtree(work)


def readme_commands(readme: Path) -> tuple[str, str]:
    """The two commands of README's first ```bash block: the demo, then the tests."""
    text = readme.read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
    if len(lines) < 2 or "dq-demo" not in lines[0] or "pytest" not in lines[1]:
        raise SystemExit(f"error: README's first bash block is not the demo and test commands: {lines}")
    return lines[0], lines[1]


def time_tests(command: str, work: Path) -> dict:
    """README's second command in its own clean clone: install + suite wall time and pytest's summary line."""
    clone, log = work / "repo-tests", work / "tests.txt"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    load_before = os.getloadavg()
    wall, rc = run_timed(command, clone, log)
    text = log.read_text(errors="replace")
    summary = next((ln.strip("= ") for ln in reversed(text.splitlines()) if " passed" in ln and " in " in ln), "")
    took = re.search(r" in ([0-9.]+)s", summary)
    pytest_s = float(took.group(1)) if took else None
    failed = [ln.strip() for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    return {"command": command, "exit": rc, "failed": failed, "wall_s": wall, "pytest_s": pytest_s,
            "install_s": round(wall - pytest_s, 1) if took else None, "summary": summary,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def tests_line(t: dict) -> str:
    failed = f" Failed: {'; '.join(t['failed'])}." if t.get("failed") else ""
    return (f"README's second command on another clean clone: exit {t['exit']}, {t['wall_s'] / 60:.1f} min in all "
            f"(install {t['install_s']} s, pytest {t['pytest_s']} s): {t['summary']}; load average before "
            f"{t['loadavg_before']}, after {t['loadavg_after']}.{failed}\n")


if __name__ == "__main__":
    main()
