"""Client retries without a server: which failures are transient, bounded backoff, one deadline, the summary line."""
from __future__ import annotations

import random

import pytest

pytest.importorskip("tritonclient.utils", reason="tritonclient not installed: pip install 'dilatequant[serve]'")

from geventhttpclient.response import HTTPConnectionClosed  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from dilatequant.core.errors import UserError  # noqa: E402
from dilatequant.engines.triton.client import InferenceFailed  # noqa: E402
from dilatequant.engines.triton.retry import (RetriesExhausted, RetryPolicy, call_with_retries,  # noqa: E402
                                              transient_reason)

STUB_DEAD = "Stub process 'unet_0_0' is not healthy."


def _server_error(message, status):
    return InferenceServerException(message, status=status)


def _wrapped(err):
    """As client.infer raises it: InferenceFailed from the tritonclient exception."""
    try:
        raise InferenceFailed(f"server rejected the request: {err.message()}") from err
    except InferenceFailed as wrapped:
        return wrapped


@pytest.mark.parametrize("err,reason", [
    (_server_error("model 'unet' is unavailable (...); retry", "503"), "unavailable"),
    (_server_error("model 'unet' is unavailable (...); retry", "StatusCode.UNAVAILABLE"), "unavailable"),
    (_server_error(STUB_DEAD, "500"), "backend crashed"),
    (_server_error(STUB_DEAD, "StatusCode.INTERNAL"), "backend crashed"),
    (_server_error("Request for unknown model: 'unet' has no available versions", "404"), "model reloading"),
    (_server_error("failed to connect to all addresses; last error: ... Connection refused",
                   "StatusCode.UNAVAILABLE"), "connection refused"),
    (_server_error("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED"), "timed out"),
    (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
    (ConnectionResetError(104, "Connection reset by peer"), "connection reset"),
    (HTTPConnectionClosed("connection closed."), "connection reset"),  # a restarting server, over HTTP
    (TimeoutError("timed out"), "timed out"),
    (_wrapped(_server_error(STUB_DEAD, "500")), "backend crashed"),
    # not transient: bad input, a model's own error, a model name that does not exist
    (_server_error("unexpected inference input 'PROMPT'", "400"), None),
    (_server_error("unknown class label 12", "500"), None),
    (_server_error("Request for unknown model: 'pipline' is not found", "404"), None),
    (_wrapped(_server_error("STEPS 0 out of range", "500")), None),
    (ValueError("bad"), None),
], ids=lambda v: v if isinstance(v, (str, type(None))) else type(v).__name__)
def test_what_is_transient(err, reason):
    assert transient_reason(err) == reason


class Clock:
    def __init__(self):
        self.t, self.sleeps = 0.0, []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def _run(policy, outcomes, clock, cost_s=0.1):
    """call_with_retries over a scripted fn: each call costs cost_s and raises or returns the next outcome."""
    calls = []

    def fn(seconds_left):
        calls.append(seconds_left)
        clock.t += cost_s
        out = outcomes[min(len(calls), len(outcomes)) - 1]
        if isinstance(out, BaseException):
            raise out
        return out

    result = call_with_retries(fn, policy, sleep=clock.sleep, clock=clock, rng=random.Random(0))
    return result, calls


def test_transient_failures_are_retried_with_growing_waits_until_served():
    clock = Clock()
    down = _server_error("model 'unet' is unavailable", "503")
    (value, attempts), calls = _run(RetryPolicy(retries=5, deadline_s=60), [down, down, ConnectionRefusedError(), "ok"],
                                    clock)
    assert value == "ok" and attempts.served and attempts.failures == ["unavailable", "unavailable",
                                                                       "connection refused"]
    assert len(calls) == 4 and calls[0] == 60 and calls[1] < 60  # each attempt gets what is left of the deadline
    for i, s in enumerate(clock.sleeps):  # equal jitter: between half and all of 0.5 s, 1 s, 2 s
        assert 0.5 * 2 ** i / 2 <= s <= 0.5 * 2 ** i
    assert attempts.summary().startswith("4 attempts in ") and "(unavailable x2, connection refused)" in \
        attempts.summary()


def test_a_non_transient_error_is_raised_at_once():
    clock = Clock()
    bad = _wrapped(_server_error("STEPS 0 out of range", "500"))
    with pytest.raises(InferenceFailed, match="STEPS 0"):
        _run(RetryPolicy(retries=5), [bad], clock)
    assert clock.sleeps == []


def test_retries_used_up_names_every_attempt_and_the_last_error():
    clock = Clock()
    with pytest.raises(RetriesExhausted) as e:
        _run(RetryPolicy(retries=2, deadline_s=60), [ConnectionRefusedError(111, "Connection refused")], clock)
    assert len(clock.sleeps) == 2 and e.value.attempts.failures == ["connection refused"] * 3
    assert str(e.value).startswith("3 attempts in ") and "(connection refused x3), --retries 2 used up; last: " \
        "ConnectionRefusedError: [Errno 111] Connection refused" in str(e.value)


def test_the_deadline_stops_retrying_before_the_retries_run_out():
    clock = Clock()
    with pytest.raises(RetriesExhausted, match=r"the deadline of 2 s \(--timeout\) ran out; last: TimeoutError: timed out"):
        _run(RetryPolicy(retries=50, deadline_s=2), [TimeoutError("timed out")], clock, cost_s=0.9)
    assert clock.t <= 2 + 0.9  # no attempt starts after the deadline, no wait crosses it


def test_backoff_is_bounded():
    policy, rng = RetryPolicy(backoff_s=0.5, max_backoff_s=8.0), random.Random(1)
    waits = [policy.wait_s(n, rng) for n in range(1, 40)]
    assert max(waits) <= 8.0 and min(waits[5:]) >= 4.0  # capped from the 5th failure on, never below half the cap


@pytest.mark.parametrize("kwargs,message", [(dict(retries=-1), "--retries must be >= 0"),
                                            (dict(deadline_s=0), "--timeout must be > 0")])
def test_bad_policy_is_one_clear_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        RetryPolicy(**kwargs)
