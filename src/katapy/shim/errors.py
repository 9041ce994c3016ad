"""Errors the shim's managers raise; the service layer maps each to a ttrpc code.

containerd turns google.rpc codes back into its errdefs (``errdefs/grpc.go``):
NotFound, InvalidArgument, AlreadyExists, FailedPrecondition, Unimplemented and
Unavailable keep their meaning there, so ``ctr`` prints them as such.
"""
from __future__ import annotations


class ShimError(Exception):
    """Base: a Task API request cannot be served; the message says why."""


class NotFound(ShimError):
    """No such container or process (or it already finished, for Kill)."""


class InvalidArgument(ShimError):
    """The request, bundle, spec or runtime options are malformed."""


class AlreadyExists(ShimError):
    """A container or exec id is already in use."""


class FailedPrecondition(ShimError):
    """The object is in the wrong state for the request (e.g. deleting a running task)."""


class Unimplemented(ShimError):
    """The request is valid but katapy does not do it (Checkpoint)."""


class Unavailable(ShimError):
    """The sandbox VM or its agent is gone."""
