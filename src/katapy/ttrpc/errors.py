"""ttrpc status codes and the exceptions that carry them.

Codes are google.rpc.Code (``google/rpc/code.proto``), which ttrpc sends in
``Response.status`` (a google.rpc.Status).  Handlers raise a :class:`TtrpcError`
(or one of its per-code subclasses); servers turn it into a Status; the client
raises the matching subclass when a call fails.  Standard library only.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Any, ClassVar


class Code(IntEnum):
    """google.rpc.Code."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(Exception):
    """A call failed with a non-OK status.

    ``code`` is a :class:`Code` when the number is known, the raw int otherwise
    (a peer may send any int32).  ``details`` holds ``google.protobuf.Any``
    messages from ``Status.details``, if any.
    """

    code: Code | int

    def __init__(self, code: Code | int, message: str = "", details: list[Any] | None = None) -> None:
        try:
            self.code = Code(code)
        except ValueError:
            self.code = int(code)
        self.message = message
        self.details: list[Any] = list(details or [])
        super().__init__(code, message)

    @property
    def code_name(self) -> str:
        return self.code.name if isinstance(self.code, Code) else str(self.code)

    def __str__(self) -> str:
        return f"ttrpc: {self.code_name}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code_name}, {self.message!r})"

    @staticmethod
    def from_status(code: int, message: str, details: list[Any] | None = None) -> TtrpcError:
        """The most specific exception for a received status (code must not be OK)."""
        if code == Code.OK:
            raise ValueError("ttrpc: status OK is not an error")
        cls = _BY_CODE.get(code)
        if cls is None:
            return TtrpcError(code, message, details)
        return cls(message, details)


class _CodedError(TtrpcError):
    """Base of the per-code subclasses: ``NotFound("container x")``."""

    CODE: ClassVar[Code]

    def __init__(self, message: str = "", details: list[Any] | None = None) -> None:
        super().__init__(self.CODE, message, details)


class Cancelled(_CodedError):
    CODE = Code.CANCELLED


class Unknown(_CodedError):
    CODE = Code.UNKNOWN


class InvalidArgument(_CodedError):
    CODE = Code.INVALID_ARGUMENT


class DeadlineExceeded(_CodedError):
    CODE = Code.DEADLINE_EXCEEDED


class NotFound(_CodedError):
    CODE = Code.NOT_FOUND


class AlreadyExists(_CodedError):
    CODE = Code.ALREADY_EXISTS


class PermissionDenied(_CodedError):
    CODE = Code.PERMISSION_DENIED


class ResourceExhausted(_CodedError):
    CODE = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(_CodedError):
    CODE = Code.FAILED_PRECONDITION


class Aborted(_CodedError):
    CODE = Code.ABORTED


class OutOfRange(_CodedError):
    CODE = Code.OUT_OF_RANGE


class Unimplemented(_CodedError):
    CODE = Code.UNIMPLEMENTED


class Internal(_CodedError):
    CODE = Code.INTERNAL


class Unavailable(_CodedError):
    CODE = Code.UNAVAILABLE


class DataLoss(_CodedError):
    CODE = Code.DATA_LOSS


class Unauthenticated(_CodedError):
    CODE = Code.UNAUTHENTICATED


_BY_CODE: dict[int, type[_CodedError]] = {cls.CODE: cls for cls in _CodedError.__subclasses__()}
