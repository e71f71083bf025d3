"""How far digit-FID moves from one draw of n images to the next: the spread that decides from how many samples
dq-verify reports it (engines/verify.py FID_MIN_SAMPLES) and the +- it prints beside it.

    python benchmarks/digit_fid_spread.py --out benchmarks/results/digit_fid_spread

Real digits: `--repeats` random subsets of n of the 4,000 training digits against the 1,000 held-out ones.
Model: one pool of `--pool` FP DDIM samples of `--model`, `--repeats` random subsets of n drawn from it (without
replacement; for n close to the pool the subsets overlap, so their spread is a lower bound). The committed run
is `--pool 0` (real digits only): 1,000 DDIM-20 samples did not finish in 20 min on the shared cores.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dilatequant.core.digit_classifier import classify
from dilatequant.core.digits import load_digits
from dilatequant.core.metrics import frechet_distance, held_out_features
from dilatequant.core.models import load_model
from dilatequant.core.reporting import environment, write_json, write_text
from dilatequant.core.sampling import sample


def spread(feats: torch.Tensor, sizes: list[int], repeats: int, seed: int) -> dict[str, dict]:
    """digit-FID of `repeats` random n-subsets of `feats` per n: mean, sample std, min, max, every value."""
    real = held_out_features()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n in sizes:
        if n > len(feats):
            continue
        vals = [frechet_distance(feats[torch.randperm(len(feats), generator=gen)[:n]].numpy(), real) for _ in range(repeats)]
        out[str(n)] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals), "min": min(vals), "max": max(vals),
                       "values": [round(v, 3) for v in vals]}
        print(f"n={n}: {out[str(n)]['mean']:.1f} +- {out[str(n)]['std']:.1f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 100, 250, 500, 1000])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--model", default="default")
    p.add_argument("--pool", type=int, default=1000, help="FP samples drawn once; 0 skips the model rows")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/digit_fid_spread"))
    a = p.parse_args()
    start = time.perf_counter()
    digits = load_digits()
    report = {"settings": {k: " ".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in vars(a).items()}, "environment": environment(),
              "real_train_digits": spread(classify(digits.train_images)[0], a.sizes, a.repeats, a.seed)}
    if a.pool:
        model = load_model(a.model)
        t0 = time.perf_counter()
        res = sample(model, num_samples=a.pool, steps=a.steps, seed=a.seed, progress=False)
        report["model"] = {"name": a.model, "pool": a.pool, "steps": a.steps, "sampling_s": round(time.perf_counter() - t0, 1),
                           "spread": spread(classify(res.images)[0], [n for n in a.sizes if n < a.pool], a.repeats, a.seed)}
    report["wall_s"] = round(time.perf_counter() - start, 1)
    write_json(a.out / "digit_fid_spread.json", report)
    rows = ["| images | n | digit-FID mean | std (seed to seed) | min..max |", "|---|---|---|---|---|"]
    groups = [("real training digits", report["real_train_digits"])]
    if "model" in report:
        groups.append((f"`{a.model}` FP DDIM-{a.steps} (pool {a.pool})", report["model"]["spread"]))
    for label, table in groups:
        rows += [f"| {label} | {n} | {s['mean']:.1f} | {s['std']:.1f} | {s['min']:.1f}..{s['max']:.1f} |" for n, s in table.items()]
    write_text(a.out / "digit_fid_spread.md", "# digit-FID spread over random draws\n\n"
               f"`python benchmarks/digit_fid_spread.py {' '.join(f'--{k} {v}' for k, v in report['settings'].items() if k != 'out')}`, "
               f"{a.repeats} draws per n\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
