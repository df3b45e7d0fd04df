"""Django support for SQLite on ltxfs: writes on a replica fail at once with
:class:`ReplicaWriteError`, which :class:`middleware.FlyReplayMiddleware` turns
into a ``fly-replay`` answer naming the primary."""

from .db import ReplicaWriteError

__all__ = ["ReplicaWriteError"]
