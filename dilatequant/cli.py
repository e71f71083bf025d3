"""Console entry points: parse arguments, call the library, turn bad input into one clear line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from .errors import UserError


def _run(fn: Callable[[], object]) -> None:
    try:
        fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def demo_main(argv: list[str] | None = None) -> None:
    from .demo import DemoConfig, run_demo

    p = argparse.ArgumentParser(prog="dq-demo", description="End-to-end demo on the embedded default models.")
    p.add_argument("--report", type=Path, default=DemoConfig.report_dir, help="report folder (default: %(default)s)")
    p.add_argument("--samples", type=int, default=DemoConfig.num_samples, help="images per model")
    p.add_argument("--steps", type=int, default=DemoConfig.steps, help="DDIM steps")
    p.add_argument("--seed", type=int, default=DemoConfig.seed)
    p.add_argument("--models", nargs="+", default=list(DemoConfig.models))
    a = p.parse_args(argv)

    def go() -> None:
        out = run_demo(DemoConfig(report_dir=a.report, models=tuple(a.models), num_samples=a.samples,
                                  steps=a.steps, seed=a.seed))
        print(f"report written to {out}/README.md")

    _run(go)
