"""dq-calibrate on a CUDA GPU: does it run, what it costs, does it agree with the CPU (issues 14 and 16).

CI has no GPU and most sessions are lent none, so this is run by hand when one is. Each job is a fresh
`dq-calibrate --device cuda` process with a fresh calibration cache, in order of what it tells:

- default-fp32, default-bf16: the embedded `default` model at bkd_autocast.py's settings (W4A8, 10 steps, 64
  samples, 20 BKD iterations per block, seed 0), FP32 and `--autocast bf16`: validation SQNR after BKD set
  against the CPU runs of benchmarks/results/bkd_autocast/bkd_autocast.json (same seed; not bit-equal: other
  kernels, other rounding).
- sd15-ptq: issue 14's acceptance run on an SD 1.5-sized pipeline (sd15_calibration.py's folder: W8A8, 4 steps,
  16 samples, no BKD, 512x512, 64x64 latents, guidance 7.5).
- sd15-bkd, sd15-bkd-bf16, sd15-bkd-bf16-teacher: W4A8 with 20 BKD iterations per block at 64x64 latents, FP32,
  `--autocast bf16`, and `--autocast bf16 --teacher-dtype bf16`.

The JSON is rewritten after every job, so a run stopped at its time budget keeps what finished; a job that
would start after the budget is listed as skipped.

    python benchmarks/gpu_calibration.py --out benchmarks/results/gpu_calibration [--budget-s 420]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dilatequant.calibrate.calibration_data import CACHE_ENV
from dilatequant.core.reporting import environment, write_json, write_text
from sd15_calibration import SD_DIGITS, build_pipeline  # benchmarks/ (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ["--model", "default", "--bits", "W4A8", "--steps", "10", "--calib-samples", "64", "--iters", "20",
           "--batch", "16", "--seed", "0"]
SD15 = ["--sym", "--steps", "4", "--calib-samples", "16", "--resolution", "512x512", "--prompts",
        str(SD_DIGITS / "prompts.txt"), "--seed", "0"]
SD15_BKD = ["--bits", "W4A8", *SD15, "--iters", "20"]
JOBS = {  # name -> (needs the SD 1.5 folder, dq-calibrate arguments)
    "default-fp32": (False, DEFAULT),
    "sd15-ptq": (True, ["--bits", "W8A8", *SD15, "--iters", "0", "--no-bkd"]),
    "sd15-bkd": (True, SD15_BKD),
    "sd15-bkd-bf16": (True, [*SD15_BKD, "--autocast", "bf16"]),
    "default-bf16": (False, [*DEFAULT, "--autocast", "bf16"]),
    "sd15-bkd-bf16-teacher": (True, [*SD15_BKD, "--autocast", "bf16", "--teacher-dtype", "bf16"]),
}
CPU_REFERENCE = {"default-fp32": ("none", 0), "default-bf16": ("bf16", 0)}  # bkd_autocast.json run: (autocast, seed)


def cpu_reference(name: str) -> float | None:
    """Validation SQNR after BKD of the same settings on this project's CPU (bkd_autocast.json)."""
    ref = REPO / "benchmarks" / "results" / "bkd_autocast" / "bkd_autocast.json"
    if name not in CPU_REFERENCE or not ref.is_file():
        return None
    mode, seed = CPU_REFERENCE[name]
    for r in json.loads(ref.read_text())["runs"]:
        if (r.get("autocast", r.get("mode")), r["seed"]) == (mode, seed):
            return r["val_sqnr_db_after_bkd"]
    return None


def run_job(name: str, args: list[str], work: Path, timeout: float, log, device: str = "cuda") -> dict:
    ckpt = work / f"{name}.q.pt"
    args = [*args, "--device", device]
    cmd = [sys.executable, "-m", "dilatequant.cli", "calibrate", *args, "--out", str(ckpt)]
    row = {"job": name, "command": "dq-calibrate " + " ".join(args).replace(str(work), "<work>")
           .replace(str(REPO) + "/", "")}
    log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    log.flush()
    with tempfile.TemporaryDirectory(prefix="dq-cache-") as cache:
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, CACHE_ENV: cache},
                                  timeout=timeout)
            row["exit"] = proc.returncode
        except subprocess.TimeoutExpired:
            row["exit"] = "timeout"
        row["wall_s"] = round(time.perf_counter() - start, 1)
    if row["exit"] != 0 or not ckpt.is_file():
        return row
    s = json.loads(torch.load(ckpt, weights_only=True, mmap=True)["summary"])
    row.update({"stages_s": {k: round(v, 2) for k, v in s["stages"].items()}, "peak_gpu_mb": s.get("peak_gpu_mb"),
                "peak_rss_mb": s["peak_rss_mb"], "val_samples": s["val_samples"],
                "val_sqnr_db_before_bkd": s["val_before_training"]["noise_sqnr_db"],
                "val_sqnr_db_after_bkd": s["val_after_training"]["noise_sqnr_db"],
                "cpu_val_sqnr_db_after_bkd": cpu_reference(name), "device": s["device"]})
    ckpt.unlink()
    return row


def markdown(res: dict) -> str:
    gpu = res["environment"].get("cuda") or "no GPU"
    lines = [f"# dq-calibrate on {gpu}", "", f"torch {res['environment']['torch']}; budget {res['budget_s']} s; SD 1.5 "
             f"folder built in {res.get('sd15_build_s', '-')} s", "",
             "| job | exit | wall s | peak GPU MB | peak RSS MB | SQNR before / after BKD (dB) | CPU after BKD (dB) | "
             "stages (s) |", "|---|---|---:|---:|---:|---|---:|---|"]
    for r in res["jobs"]:
        sq = (f"{r['val_sqnr_db_before_bkd']:.2f} / {r['val_sqnr_db_after_bkd']:.2f}"
              if "val_sqnr_db_after_bkd" in r else "-")
        cpu = r.get("cpu_val_sqnr_db_after_bkd")
        stages = ", ".join(f"{k} {v:.1f}" for k, v in (r.get("stages_s") or {}).items())
        lines.append(f"| {r['job']} | {r.get('exit', 'skipped')} | {r.get('wall_s', '-')} | "
                     f"{r.get('peak_gpu_mb', '-')} | {r.get('peak_rss_mb', '-')} | {sq} | "
                     f"{f'{cpu:.2f}' if cpu else '-'} | {stages} |")
    lines += ["", "Commands:", *[f"- {r['job']}: `{r['command']}`" for r in res["jobs"] if "command" in r], ""]
    lines += [f"- {n}" for n in res.get("notes", [])]  # what a reading of the run found (added by hand)
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_calibration"))
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dq-gpu-calibration",
                   help="the SD 1.5 pipeline folder (3.8 GB) and the q.pt files go here, not into the repository")
    p.add_argument("--budget-s", type=float, default=420.0, help="no job starts after this many seconds")
    p.add_argument("--jobs", nargs="*", choices=list(JOBS), default=list(JOBS))
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try this script itself")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_calibration.py needs a CUDA build of PyTorch and a visible GPU "
                         "(or --device cpu to try it)")
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    res = {"budget_s": a.budget_s, "jobs": [], "environment": environment()}
    with open(a.out / "gpu_calibration.log", "w") as log:
        for name in a.jobs:
            needs_sd15, args = JOBS[name]
            left = a.budget_s - (time.perf_counter() - start)
            if left <= 0:
                res["jobs"].append({"job": name, "exit": "skipped (budget)"})
                continue
            if needs_sd15:
                folder = a.work / "sd15-random"
                if "sd15_build_s" not in res:
                    res["sd15_build_s"] = build_pipeline(folder, seed=0)["build_s"]
                    left = a.budget_s - (time.perf_counter() - start)
                args = ["--model", str(folder), *args]
            res["jobs"].append(run_job(name, args, a.work, max(left, 1.0), log, a.device))
            write_json(a.out / "gpu_calibration.json", res)
            write_text(a.out / "gpu_calibration.md", markdown(res))
            print(markdown(res), flush=True)
    write_json(a.out / "gpu_calibration.json", res)
    write_text(a.out / "gpu_calibration.md", markdown(res))


if __name__ == "__main__":
    main()
