"""What an upstream answer is made of, for every upstream (an HPC platform through hpcbridge, an
external provider through gateway/external.py): a ``Head``, ``Progress`` while a request is held
through a cold start, body ``bytes``, or an ``UpstreamError`` that is safe to show to the API client.

The HPC side's own refusal (``hpcside.serve.StreamError``) has the same four fields and reaches the
web side as an ERROR frame's payload, which hpcbridge turns into an ``UpstreamError``: hpcside stays
standard-library only and imports nothing from here.
"""

from __future__ import annotations

from dataclasses import dataclass


class UpstreamError(Exception):
    """A request failed upstream; ``status``/``code``/``message`` are safe to show to the API client."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


@dataclass(frozen=True)
class Head:
    status: int
    headers: dict[str, str]
    instance: str = ""  # the model instance that answered (an HPC platform's), for the charge-back
    platform: str = ""  # the HPC platform it runs on


@dataclass(frozen=True)
class Progress:
    stage: str
    message: str
    elapsed: float


Event = Head | Progress | bytes
