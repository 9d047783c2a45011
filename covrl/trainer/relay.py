"""Weights from the learner to the rollout servers in one pass: :class:`WeightRelay`.

The learner's GetWeights stream is forwarded chunk by chunk, still serialized, into one
UpdateWeights stream per healthy rollout server, so the servers receive while the learner
is still sending. Before, the trainer decoded the whole model, then encoded it again for
each server: two full passes over the bytes, one after the other.

The relay keeps every chunk it has seen (as many bytes as the decoded model was), so a
server's push can start late or start again from the first chunk. It holds back the newest
chunk until it knows the stream went on or ended, and releases the final one only when it
has ``last`` set: a learner stream cut short never reaches a server as a complete-looking
one; the servers' pushes are aborted instead, and the learner's error is raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from covrl._proto.v1 import rollout_pb2


class RelayAborted(RuntimeError):
    """The learner's side of the relay failed; pushes fed by it must not count against a server."""


class WeightRelay:
    """One learner stream fanned out to any number of readers (see the module docstring)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._done = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def _release(self, raw: bytes | None, *, done: bool = False, error: BaseException | None = None) -> None:
        with self._cond:
            if raw is not None:
                self._chunks.append(raw)
            self._done = self._done or done
            self._error = self._error or error
            self._cond.notify_all()

    def feed(self, source: Iterator[bytes], on_version: Callable[[int], None]) -> int:
        """Read ``source`` to its end, releasing chunks to the readers; returns the weight
        version. ``on_version(version)`` runs once the first chunk names it (start the
        pushes there). Any failure of ``source`` aborts the readers and is raised."""
        held: bytes | None = None
        version = None
        try:
            for raw in source:
                if version is None:
                    version = int(rollout_pb2.TensorChunk.FromString(raw).weight_version)
                    on_version(version)
                if held is not None:
                    self._release(held)
                held = raw
            if held is None:
                raise RuntimeError("the learner's weight stream was empty")
            if not rollout_pb2.TensorChunk.FromString(held).last:
                raise RuntimeError("the learner's weight stream ended before its last chunk")
        except BaseException as e:
            self._release(None, error=e)
            raise
        self._release(held, done=True)
        return version

    def abort(self, error: BaseException) -> None:
        """Stop every reader (the pushes they feed fail) without a learner failure."""
        self._release(None, error=error)

    def reader(self) -> Iterator[bytes]:
        """Every chunk from the first, waiting for the ones not released yet; raises
        :class:`RelayAborted` when the stream failed."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._chunks) and not self._done and self._error is None:
                    self._cond.wait()
                if self._error is not None:
                    raise RelayAborted(f"the weight stream from the learner failed: {self._error}")
                if i >= len(self._chunks):
                    return
                ready = self._chunks[i:]
            i += len(ready)
            yield from ready
