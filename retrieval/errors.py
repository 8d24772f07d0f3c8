"""The service's exception hierarchy.

Every engine raises these; the server maps them to gRPC status codes in one place
(:mod:`retrieval.server.interceptors`). Messages are sentences a person can act on: they name the
argument, the value received and what was expected.
"""

from __future__ import annotations

import grpc


class RetrievalError(Exception):
    """Base class. ``code`` is the gRPC status the server answers with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(RetrievalError, ValueError):
    """Bad input: wrong shape, NaN, out-of-range parameter, malformed filter or name."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RetrievalError, KeyError):
    """An unknown collection, point, job, graph or datastore."""

    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError quotes its message; we want the sentence as is.
        return str(self.args[0]) if self.args else ""


class AlreadyExists(RetrievalError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(RetrievalError):
    """A configured limit was hit (k, batch size, message size, capacity, disk)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RetrievalError):
    """The request is valid but the object is not in a state to serve it (e.g. index not trained)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(RetrievalError):
    """A dependency (e.g. a Ray cluster, the disk) is not answering; the client may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(RetrievalError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(RetrievalError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RetrievalError):
    code = grpc.StatusCode.PERMISSION_DENIED
