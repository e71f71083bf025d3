"""Calibration prompts: a file with one prompt per line, or the small general set shipped with the package."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import UserError


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 file; an empty, missing or non-UTF-8 file is one clear error."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as err:
        raise UserError(f"prompt file '{path}' does not exist; pass a UTF-8 text file with one prompt per line") from err
    except UnicodeDecodeError as err:
        raise UserError(f"prompt file '{path}' is not UTF-8 text (byte {err.start}); save it as UTF-8, "
                        "one prompt per line") from err
    except OSError as err:
        raise UserError(f"cannot read prompt file '{path}': {err.strerror}") from err
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file '{path}' holds no prompts; write one prompt per line")
    return prompts


def default_prompts() -> list[str]:
    return read_prompts(Path(str(resources.files("dilatequant") / "assets" / "prompts" / "default.txt")))


def calibration_prompts(model) -> list[str]:
    """The prompts a model calibrates on unless told: its folder's own (dilatequant.json), else the general set.

    A model trained on a narrow domain (sd-digits: captions of digits) gains nothing from "a red cat"; its
    folder names the prompts it is used with."""
    return list(model.default_prompts) if model.default_prompts else default_prompts()
