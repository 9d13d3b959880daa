"""A gallery's write-ahead log: append-only, checksummed records of adds and removes, in segment files.

Why: an acknowledged add must be durable without rewriting the whole gallery. A write is appended here
and fsynced (``fdatasync``) before it is acknowledged; the vector store and the metadata are updated in
memory / SQLite afterwards, and snapshots (``index.generations``) are taken now and then in the
background. Recovery is the newest verified snapshot plus a replay of the records after it.

Layout of ``<gallery>/log/``::

    00000000000000000001.wal   records with positions 1, 2, ... (the name is the first one's position)
    00000000000000000951.wal   a newer segment, started when a snapshot was taken at position 950

A record is ``MAGIC | position (u64) | kind (u8) | payload length (u32) | crc32 | payload``, little
endian, where the CRC-32 covers position, kind, length and payload. Positions are consecutive across
segments, so a missing segment or record is detected. Kinds: ``add`` (the new items' ids and metadata,
ids of existing items that gained their image bytes, and the float32 vectors (N, T, D) of the new items
under every task, in task order) and ``remove`` (ids). A payload is a JSON header, then raw vector bytes.

Reading: the last record of the last segment may be torn (a crash inside ``append``): it was never
fsynced, so never acknowledged; it is dropped and the warning names the segment, offset and position.
A damaged record that is followed by a valid one is not a tail: acknowledged writes come after it, so
reading stops with ``LogCorruptError`` instead of dropping them.

Segments are deleted by ``truncate_through(p)`` once every record in them is covered by the snapshots
that are kept (see ``index.gallery``); the newest segment is never deleted.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.data.base import LabelValue
from model.durable import fsync_path

log = logging.getLogger(__name__)

MAGIC = b"MRWL"
_HEADER = struct.Struct("<4sQBII")  # magic, position, kind, payload length, crc32
_SUFFIX = ".wal"
MAX_PAYLOAD = 1 << 31  # a length past this is garbage, not a record
ADD, REMOVE = 1, 2
_KIND_NAMES = {ADD: "add", REMOVE: "remove"}


class LogCorruptError(RuntimeError):
    """The log is damaged where acknowledged records follow (not a torn tail); the message says where."""


class LogStateUnknown(RuntimeError):
    """A failed append could not be undone: what the segment's end holds is unknown until it is read."""


@dataclass(frozen=True)
class ItemRecord:
    """One gallery item as the log records it and the metadata returns it (``index.metadata``)."""

    id: int
    source: str
    content_hash: str
    width: int
    height: int
    labels: dict[str, LabelValue]
    has_blob: bool
    added_at: str


@dataclass(frozen=True)
class Record:
    position: int
    kind: int  # ADD or REMOVE
    items: list[ItemRecord] = field(default_factory=list)  # ADD: the new items
    vectors: np.ndarray | None = None  # ADD: (len(items), T, D) float32
    ids: list[int] = field(default_factory=list)  # ADD: existing items that got a blob; REMOVE: removed

    @property
    def kind_name(self) -> str:
        return _KIND_NAMES[self.kind]


def encode_add(items: Sequence[ItemRecord], vectors: np.ndarray, blob_ids: Sequence[int]) -> bytes:
    """The payload of an add record; ``vectors`` is (len(items), T, D)."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    header = {
        "items": [item.__dict__ for item in items],
        "blob_ids": [int(i) for i in blob_ids],
        "shape": list(vectors.shape),
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + vectors.tobytes()


def encode_remove(ids: Sequence[int]) -> bytes:
    return json.dumps({"ids": [int(i) for i in ids]}).encode()


def _decode(position: int, kind: int, payload: bytes) -> Record:
    if kind == REMOVE:
        return Record(position, kind, ids=[int(i) for i in json.loads(payload)["ids"]])
    if kind != ADD:
        raise ValueError(f"unknown record kind {kind}")
    (head_len,) = struct.unpack_from("<I", payload)
    header: dict[str, Any] = json.loads(payload[4 : 4 + head_len])
    shape = tuple(int(n) for n in header["shape"])
    vectors = np.frombuffer(payload, dtype="<f4", offset=4 + head_len).reshape(shape)
    items = [ItemRecord(**entry) for entry in header["items"]]
    return Record(position, kind, items=items, vectors=vectors.astype(np.float32), ids=header["blob_ids"])


def frame(position: int, kind: int, payload: bytes) -> bytes:
    """One record's bytes: header with checksum, then the payload."""
    body = struct.pack("<QBI", position, kind, len(payload)) + payload
    return _HEADER.pack(MAGIC, position, kind, len(payload), zlib.crc32(body)) + payload


def _parse(data: bytes, offset: int) -> tuple[Record, int] | str:
    """The record at ``offset`` and the offset after it, or why there is none."""
    if len(data) - offset < _HEADER.size:
        return f"{len(data) - offset} bytes of an incomplete record header"
    magic, position, kind, length, crc = _HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        return "no record marker (garbage)"
    if length > MAX_PAYLOAD:
        return f"implausible payload length {length}"
    end = offset + _HEADER.size + length
    if end > len(data):
        return f"payload cut short ({len(data) - offset - _HEADER.size} of {length} bytes)"
    payload = data[offset + _HEADER.size : end]
    if zlib.crc32(struct.pack("<QBI", position, kind, length) + payload) != crc:
        return "checksum mismatch"
    try:
        return _decode(position, kind, payload), end
    except (ValueError, KeyError, TypeError, struct.error) as e:
        return f"undecodable payload ({e})"


def _later_record(data: bytes, offset: int, after: int) -> int | None:
    """Offset of a valid record with position > ``after`` somewhere after ``offset``, if any."""
    start = offset + 1
    while (found := data.find(MAGIC, start)) >= 0:
        parsed = _parse(data, found)
        if not isinstance(parsed, str) and parsed[0].position > after:
            return found
        start = found + 1
    return None


@dataclass(frozen=True)
class Tail:
    """A torn or corrupt last record: where it is and why it does not count."""

    segment: Path
    offset: int
    position: int
    reason: str
    size: int  # bytes from ``offset`` to the end of the segment

    def describe(self) -> str:
        return (
            f"{self.segment.name}: dropped an incomplete record at byte {self.offset} "
            f"(position {self.position}, {self.size} bytes: {self.reason}); it was never acknowledged"
        )


@dataclass
class LogScan:
    records: list[Record]
    first: int  # position of the first record the log holds (or would hold, when empty)
    last: int  # position of the last valid record (first - 1 when empty)
    segments: list[Path]
    tail: Tail | None
    size: int  # bytes in all segments


def _first_position(path: Path) -> int:
    return int(path.stem)


def segment_name(first: int) -> str:
    return f"{first:020d}{_SUFFIX}"


class WriteAheadLog:
    """The segments under ``directory``; ``scan`` reads them, ``open_for_append`` starts writing."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._segment: Path | None = None
        self.next_position = 1
        self.syncs = 0  # fsyncs done by append (group commit shares them)
        self.appended = 0  # records appended by this process
        self._last_append: tuple[int, int, list[int]] | None = None  # (first position, offset, frame sizes)

    def segments(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        paths = [p for p in self.directory.glob(f"*{_SUFFIX}") if p.stem.isdigit()]
        return sorted(paths, key=_first_position)

    def scan(self, *, after: int = 0) -> LogScan:
        """Every valid record (those with position > ``after`` decoded), checked for continuity; a torn
        tail is reported in ``tail``; damage with valid records after it raises ``LogCorruptError``."""
        segments = self.segments()
        records: list[Record] = []
        first = _first_position(segments[0]) if segments else 1
        expected = first
        tail: Tail | None = None
        size = 0
        for number, segment in enumerate(segments):
            data = segment.read_bytes()
            size += len(data)
            if _first_position(segment) != expected:
                raise LogCorruptError(
                    f"{segment.name}: starts at position {_first_position(segment)}, expected {expected} "
                    "(a segment is missing or was renamed)"
                )
            offset = 0
            while offset < len(data):
                parsed = _parse(data, offset)
                if not isinstance(parsed, str) and parsed[0].position != expected:
                    parsed = f"position {parsed[0].position} where {expected} was expected"
                if isinstance(parsed, str):
                    later = _later_record(data, offset, expected - 1)
                    more = any(s.stat().st_size for s in segments[number + 1 :])
                    if later is not None or more:
                        raise LogCorruptError(
                            f"{segment.name}: record {expected} at byte {offset} is damaged ({parsed}) and "
                            "acknowledged records follow it; restore the log from a backup, or run "
                            "`modret index recover` to keep what precedes it"
                        )
                    tail = Tail(segment, offset, expected, parsed, len(data) - offset)
                    break
                record, offset = parsed
                if record.position > after:
                    records.append(record)
                expected += 1
        return LogScan(records, first, expected - 1, segments, tail, size)

    def open_for_append(self, scan: LogScan, next_position: int | None = None) -> None:
        """Cut a torn tail off (so the next record follows the last valid one) and open the last segment;
        ``next_position`` (default: after the last record) for a log whose records a snapshot covers."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.next_position = max(scan.last + 1, next_position or 0)
        if scan.tail is not None:
            log.warning("write-ahead log: %s", scan.tail.describe())
            with open(scan.tail.segment, "r+b") as f:
                f.truncate(scan.tail.offset)
                os.fsync(f.fileno())
        if scan.segments:
            self._open_segment(scan.segments[-1])
        else:
            self.rotate()

    def _open_segment(self, path: Path) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._segment = path
        self._last_append = None  # rewind only ever cuts the segment it appended to

    def rotate(self) -> None:
        """Start a new segment at ``next_position`` (its directory entry made durable first)."""
        path = self.directory / segment_name(self.next_position)
        if path == self._segment:
            return
        self._open_segment(path)
        fsync_path(self.directory)

    def append(self, records: Sequence[tuple[int, bytes]]) -> int:
        """Append ``(kind, payload)`` records with one write and one fsync; returns the last position.

        If the write or the fsync fails, the segment is cut back to where the append began (and fsynced):
        the log is then as before and the error propagates, so a full disk refuses one batch and the log
        takes the next. If even that fails, ``LogStateUnknown`` is raised from the error."""
        if self._fd is None:
            raise RuntimeError("the write-ahead log is not open for appending")
        if not records:
            return self.next_position - 1
        frames: list[bytes] = []
        for kind, payload in records:
            frames.append(frame(self.next_position + len(frames), kind, payload))
        data = b"".join(frames)
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # os.write may write less; the rest follows
                written += os.write(self._fd, data[written:])
            os.fdatasync(self._fd)
        except OSError:
            self._cut(start)
            raise
        self.syncs += 1
        self.appended += len(records)
        self._last_append = (self.next_position, start, [len(f) for f in frames])
        self.next_position += len(records)
        return self.next_position - 1

    def rewind(self, keep_through: int) -> None:
        """Drop the records after position ``keep_through`` that the last ``append`` wrote (never applied:
        the committer could not apply them), cutting the segment back durably."""
        if self._last_append is None:
            raise RuntimeError("nothing appended to rewind")
        first, start, sizes = self._last_append
        keep = keep_through - first + 1
        if not 0 <= keep <= len(sizes):
            raise ValueError(
                f"position {keep_through} is outside the last append ({first}..{first + len(sizes) - 1})"
            )
        self._cut(start + sum(sizes[:keep]))
        self.appended -= len(sizes) - keep
        self.next_position = keep_through + 1
        self._last_append = None

    def _cut(self, size: int) -> None:
        """Truncate the open segment to ``size`` bytes, durably; ``LogStateUnknown`` if that fails."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        except OSError as exc:
            raise LogStateUnknown(
                f"{self._segment}: a failed append could not be cut back to {size} bytes ({exc})"
            ) from exc

    def truncate_through(self, position: int) -> list[Path]:
        """Delete the segments whose records all have positions ≤ ``position`` (never the newest)."""
        segments = self.segments()
        doomed = [
            segment
            for segment, following in itertools.pairwise(segments)
            if _first_position(following) <= position + 1
        ]
        for segment in doomed:
            segment.unlink()
        if doomed:
            fsync_path(self.directory)
        return doomed

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._segment = None
