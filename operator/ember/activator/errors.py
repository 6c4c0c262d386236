"""The activator's errors: one hierarchy, mapped to HTTP once per API at the edge."""

from __future__ import annotations


class ActivatorError(Exception):
    """An invocation that cannot be served; `status` and `error_type` say how the edge answers."""

    status = 500
    error_type = "ServiceException"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class BadRequest(ActivatorError):
    """The request is malformed (a header, the body, a parameter)."""

    status = 400
    error_type = "InvalidParameterValueException"


class InvalidContent(BadRequest):
    """The body is not JSON."""

    error_type = "InvalidRequestContentException"


class FunctionNotFound(ActivatorError):
    """No such function, or no such Version or alias of it."""

    status = 404
    error_type = "ResourceNotFoundException"


class PayloadTooLarge(ActivatorError):
    """The body is larger than the configured limit."""

    status = 413
    error_type = "RequestTooLargeException"


class Throttled(ActivatorError):
    """Every pod slot is taken and the Version's queue is full."""

    status = 429
    error_type = "TooManyRequestsException"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(ActivatorError):
    """The function has no Version that can serve (its only Versions failed to load)."""

    status = 502
    error_type = "ResourceNotReadyException"


class PodFailed(ActivatorError):
    """The pod answered in a way the contract does not allow."""

    status = 502
    error_type = "ServiceException"


class CapacityTimeout(ActivatorError):
    """The activator's own wait for a free pod slot timed out."""

    status = 504
    error_type = "CapacityTimeoutException"


class StoreUnavailable(ActivatorError):
    """The asynchronous invocations' store cannot be reached: nothing was accepted."""

    status = 503
    error_type = "ServiceException"
