"""Image sizes given on the command line; no torch import, so the Triton client can parse them too."""
from __future__ import annotations

from .errors import UserError


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """'HxW' (or one number for a square) -> (H, W)."""
    try:
        parts = [int(v) for v in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise UserError(f"{flag} must be HxW in pixels, e.g. 512x512; got '{text}'")
    return parts[0], parts[1]
