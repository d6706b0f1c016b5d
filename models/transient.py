"""Is a storage or registry error one that may pass on a later try?

Transient: the connection was refused, reset or timed out, or the server answered 5xx, 429 or a
throttling code (S3 ``SlowDown``, ``Throttling``...). Permanent: anything else -- 403 (no right),
404 (not there), bad data -- which no retry mends. The libraries retry transient errors themselves
first (botocore's retry modes for S3, MLflow's urllib3 ``Retry`` for its REST and artifact calls);
this tells the caller, once they gave up, whether to say "try again later" (the flows retry the
task) or to fail the scan at once.

The exception chain (``__cause__`` / ``__context__``) is walked: s3fs turns a botocore error into
an ``OSError`` caused by it, MLflow wraps ``requests`` errors in an ``MlflowException``.
"""

from __future__ import annotations

THROTTLING_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException", "RequestTimeout", "RequestTimeoutException",
    "PriorRequestNotComplete", "InternalError", "ServiceUnavailable", "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED", "INTERNAL_ERROR",
})


def _status_says_transient(status: object) -> bool | None:
    try:
        status = int(status)
    except (TypeError, ValueError):
        return None
    return status >= 500 or status == 429


def _one(exc: BaseException) -> bool | None:
    """True / False when this exception alone decides, None to look at its cause."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = (response.get("Error") or {}).get("Code")
        if code in THROTTLING_CODES:
            return True
        return bool(_status_says_transient((response.get("ResponseMetadata") or {}).get("HTTPStatusCode")))
    if response is not None and hasattr(response, "status_code"):  # requests.HTTPError
        return bool(_status_says_transient(response.status_code))
    code = getattr(exc, "error_code", None)  # MlflowException
    if isinstance(code, str) and code in THROTTLING_CODES:
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):  # refused, reset, aborted, timed out (builtin)
        return True
    names = {cls.__module__.split(".")[0] + "." + cls.__name__ for cls in type(exc).__mro__}
    # botocore's connection errors (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError
    # ...), aiohttp's client connection errors, requests' ConnectionError / Timeout / RetryError
    if names & {"botocore.HTTPClientError", "botocore.ConnectionError", "aiohttp.ClientConnectionError",
                "aiohttp.ClientPayloadError", "aiohttp.ServerTimeoutError", "requests.ConnectionError",
                "requests.Timeout", "requests.RetryError", "urllib3.MaxRetryError", "urllib3.ProtocolError"}:
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is a transient storage / network error (module docstring)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _one(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False
