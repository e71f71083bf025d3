"""Which activation quantizer of a q.pt costs the most accuracy (a benchmark, never a test).

Each quantizer is switched off alone and the noise SQNR against FP is measured on FP trajectory
inputs; then the whole evaluation (per-step noise, images vs FP, digit-FID) is rerun with the
worst quantizer off, against the same FP samples as benchmarks/ablation.py.

    python benchmarks/layer_sensitivity.py --ckpt benchmarks/results/ablation/default_W8A8_dilatequant.q.pt \
        --out benchmarks/results/layer_sensitivity/default_W8A8
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.core.evaluation import compare_to_fp, fp_reference, fp_trajectories
from dilatequant.core.guidance import DEFAULT_GUIDANCE
from dilatequant.core.metrics import sqnr_db
from dilatequant.core.reporting import environment, write_json
from dilatequant.core.sampling import fp_predictor
from dilatequant.engines.runners import fp_model_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--eval-samples", type=int, default=250, help="0 skips the full evaluation")
    p.add_argument("--seed", type=int, default=100, help="ablation.py evaluates with its --seed + 100")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    ck = load_checkpoint(a.ckpt)
    q, model, steps = ck.qunet, fp_model_of(ck), len(ck.timesteps)  # ck.model holds the quantized UNet
    guidance = DEFAULT_GUIDANCE if model.is_conditional else 1.0
    traj = fp_trajectories(model, steps, a.seed, guidance, num=8).trajectory
    pick = sorted(set(range(0, steps, 5)) | {steps - 5, steps - 3, steps - 1})
    x, t, ti = (torch.cat([v[i] for i in pick]) for v in (traj.sample, traj.timestep, traj.t_index))
    ehs = None if traj.encoder_hidden_states is None else torch.cat([traj.encoder_hidden_states[i] for i in pick])
    ref = fp_predictor(model)(x, t, ti, ehs)
    with torch.no_grad():
        def score() -> float:
            return sqnr_db(q(x, t, ti, ehs), ref)

        result = {"settings": {k: str(v) for k, v in vars(a).items()} | {"t_index": pick},
                  "environment": environment(), "all_quantized_db": score()}
        q.set_quant(weights=False, acts="quant")
        result["activations_only_db"] = score()
        q.set_quant(weights=True, acts="off")
        result["weights_only_db"] = score()
        q.set_quant(weights=True, acts="quant")
        without = {}
        for name, quantizer in q.act_quantizers.items():
            quantizer.mode = "off"
            without[name] = score()
            quantizer.mode = "quant"
    result["without_one_quantizer_db"] = dict(sorted(without.items(), key=lambda kv: -kv[1]))
    worst = next(iter(result["without_one_quantizer_db"]))
    print(json.dumps({k: v for k, v in result.items() if k not in ("environment", "without_one_quantizer_db")}))
    print("worst quantizer:", worst, round(without[worst], 2), "dB without it")
    if a.eval_samples:
        fp_images, fp_traj = fp_reference(model, a.eval_samples, steps, a.seed, guidance)
        runs = {}
        for label, off in (("all quantized", None), (f"{worst} input in float", worst)):
            if off:
                q.act_quantizers[off].mode = "off"
            metrics, _ = compare_to_fp(model, q.predictor(), fp_images, fp_traj, steps, a.seed, guidance)
            runs[label] = metrics
            print(label, {k: v for k, v in metrics.items() if k not in ("noise_per_step", "class_share")}, flush=True)
        result["evaluation"] = runs
    write_json(a.out / "sensitivity.json", result)


if __name__ == "__main__":
    main()
