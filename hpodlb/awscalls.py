"""A tally of the AWS calls an adapter made, by operation and outcome, for the metrics.

The adapters (`targets.TargetGroup`, `hyperpod.HyperPod`) count here as they call; the daemon takes
the tally after each pass (on the pass's own thread, where every AWS call happens). Plain Python:
the core and the adapters never import prometheus_client. One call is one API operation as the
adapter sees it, after botocore's own retries. The outcome is a small fixed set, never AWS's raw
error code: an alert wants "denied" or "throttled", and a label must not grow without bound.
"""

from __future__ import annotations

from collections import Counter

OUTCOMES = ("ok", "throttled", "denied", "invalid", "unreachable", "error")
# botocore's own list of throttling codes, the ones elbv2 and sagemaker answer with.
THROTTLED = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
    }
)
DENIED = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnauthorizedOperation",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredToken",
        "ExpiredTokenException",
        "AuthFailure",
        "SignatureDoesNotMatch",
    }
)
INVALID = frozenset({"ValidationError", "ValidationException", "InvalidTarget"})


def outcome_of(code: str) -> str:
    """The outcome label of an AWS error code (`unreachable`: no answer at all from AWS)."""
    if code in THROTTLED:
        return "throttled"
    if code in DENIED:
        return "denied"
    if code in INVALID:
        return "invalid"
    return "error"


class CallTally:
    """(operation, outcome) -> calls since the last `take`."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()

    def ok(self, operation: str) -> None:
        self._counts[operation, "ok"] += 1

    def failed(self, operation: str, code: str) -> None:
        self._counts[operation, outcome_of(code)] += 1

    def unreachable(self, operation: str) -> None:
        self._counts[operation, "unreachable"] += 1

    def take(self) -> Counter[tuple[str, str]]:
        """What was counted since the last take, and start again from zero."""
        counts, self._counts = self._counts, Counter()
        return counts
