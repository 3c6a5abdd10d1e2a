"""Errors of the local stack."""


class InfraError(RuntimeError):
    """A local-stack operation failed; the message says what to do about it."""
