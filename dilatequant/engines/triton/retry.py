"""Client retries: failures that go away by themselves (the server restarting, a model being reloaded after its
backend crashed, a request that timed out) are tried again with bounded exponential backoff inside one deadline;
anything else (bad input, a model's own error) fails at once.

What counts as transient, from Triton 2.51's answers (docs/triton.md, "Client retries"):
- HTTP 503 / gRPC UNAVAILABLE: our pipeline models answer so while a model they call is being reloaded, and gRPC
  says so when nothing listens (the server restarting);
- "Stub process '<instance>' is not healthy." (HTTP 500 / gRPC INTERNAL): a Python-backend process died and the
  request reached it before dq-serve unloaded it;
- "... has no available versions" / "... is not ready" (HTTP 404 / NOT_FOUND, 400): a model between unload and load;
- connection refused or reset (HTTP; also a connection the server closed before it answered, as a restarting server
  does: geventhttpclient's HTTPConnectionClosed), and timeouts (HTTP socket timeout, gRPC DEADLINE_EXCEEDED).
A model name that is not in the repository at all ("is not found") is not transient: it is a typo.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, TypeVar

from ...core.errors import UserError

T = TypeVar("T")

TRANSIENT_MESSAGES = {  # substring of a server message -> the reason we report
    "is not healthy": "backend crashed",
    "has no available versions": "model reloading",
    "is not ready": "model reloading",
    "health mutex": "backend crashed",
}


@dataclass
class RetryPolicy:
    """`retries` more attempts after the first, none started after `deadline_s` (the whole call's budget)."""

    retries: int = 5
    deadline_s: float = 300.0
    backoff_s: float = 0.5      # the first wait; doubled after each failed attempt ...
    max_backoff_s: float = 8.0  # ... up to this (so 5 retries wait at most 0.5 + 1 + 2 + 4 + 8 = 15.5 s)

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise UserError(f"--retries must be >= 0, got {self.retries}")
        if not self.deadline_s > 0:
            raise UserError(f"--timeout must be > 0 seconds, got {self.deadline_s}")

    def wait_s(self, failed: int, rng: random.Random) -> float:
        """Equal jitter: half the doubled backoff, plus up to half again at random (clients that failed together
        do not come back together)."""
        b = min(self.max_backoff_s, self.backoff_s * 2 ** (failed - 1))
        return b / 2 + rng.uniform(0, b / 2)


def transient_reason(err: BaseException) -> str | None:
    """A short name for a failure worth retrying; None for one that is not."""
    from tritonclient.utils import InferenceServerException

    while err is not None:
        if isinstance(err, InferenceServerException):
            status, message = str(err.status() or ""), str(err.message() or "")
            if status == "StatusCode.DEADLINE_EXCEEDED":
                return "timed out"
            if "failed to connect" in message:  # gRPC, nothing listening
                return "connection refused"
            if status in ("503", "StatusCode.UNAVAILABLE"):
                return "unavailable"
            return next((reason for needle, reason in TRANSIENT_MESSAGES.items() if needle in message), None)
        if isinstance(err, ConnectionRefusedError):
            return "connection refused"
        if isinstance(err, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)) or _closed_by_server(err):
            return "connection reset"
        if isinstance(err, TimeoutError):
            return "timed out"
        err = err.__cause__
    return None


def _closed_by_server(err: BaseException) -> bool:
    """tritonclient's HTTP transport (geventhttpclient) reports a connection closed without an answer in its own
    exception, not as ConnectionResetError."""
    try:
        from geventhttpclient.response import HTTPConnectionClosed
    except ImportError:
        return False
    return isinstance(err, HTTPConnectionClosed)


@dataclass
class Attempts:
    """What was tried: one reason per failed attempt, and the time it all took."""

    failures: list[str]
    elapsed_s: float
    served: bool

    def summary(self) -> str:
        n = len(self.failures) + int(self.served)
        counts = ", ".join(f"{reason} x{k}" if k > 1 else reason for reason, k in Counter(self.failures).items())
        return f"{n} attempt{'s' if n != 1 else ''} in {self.elapsed_s:.1f} s" + (f" ({counts})" if counts else "")


class RetriesExhausted(UserError):
    """Every attempt failed transiently, or the deadline came first; `attempts` says what was tried."""

    def __init__(self, message: str, attempts: Attempts) -> None:
        super().__init__(message)
        self.attempts = attempts


def describe_error(err: BaseException) -> str:
    """The server's message for a server error (our InferenceFailed already holds it), else type and text."""
    from tritonclient.utils import InferenceServerException

    if isinstance(err, InferenceServerException):
        return str(err.message())
    return str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"


def call_with_retries(fn: Callable[[float], T], policy: RetryPolicy,
                      describe: Callable[[BaseException], str] = describe_error,
                      sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                      rng: random.Random | None = None) -> tuple[T, Attempts]:
    """fn(seconds left) until it returns, a non-transient error (raised as is), the retries run out or the
    deadline passes (RetriesExhausted, whose message names every attempt and the last error)."""
    rng = rng or random.Random()
    start = clock()
    failures: list[str] = []
    last: BaseException | None = None
    while True:
        left = policy.deadline_s - (clock() - start)
        if left <= 0:
            break
        try:
            return fn(left), Attempts(failures, clock() - start, True)
        except Exception as err:  # classified below: only transient failures are retried
            reason = transient_reason(err)
            if reason is None:
                raise
            failures.append(reason)
            last = err
        if len(failures) > policy.retries:
            break
        wait = policy.wait_s(len(failures), rng)
        if clock() - start + wait >= policy.deadline_s:
            break
        sleep(wait)
    attempts = Attempts(failures, clock() - start, False)
    why = (f"the deadline of {policy.deadline_s:g} s (--timeout) ran out" if len(failures) <= policy.retries else
           f"--retries {policy.retries} used up")
    raise RetriesExhausted(f"{attempts.summary()}, {why}; last: {describe(last)}", attempts) from last
