"""Reading an indexed RecordIO file (MXNet's `.rec` + `.idx`) in plain Python, for worker
processes that should not load MXNet (`distft check`). Writing goes through MXNet's own writer
(`makerec.py`), which splits a record wherever the magic number occurs in the data."""
from __future__ import annotations

import struct

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")  # MXNet's IRHeader: flag, label, id, id2


def read_index(idx_path: str) -> list[tuple[int, int]]:
    """[(key, byte offset)] in file order."""
    entries = []
    with open(idx_path) as fh:
        for line in fh:
            if line.strip():
                key, offset = line.split("\t")
                entries.append((int(key), int(offset)))
    return entries


def read_record(fh, offset: int) -> bytes:
    """The record at `offset` (parts of a split record are joined with the magic between them)."""
    fh.seek(offset)
    parts = []
    while True:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("truncated record")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise ValueError("bad magic number")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        data = fh.read(length)
        if len(data) < length:
            raise ValueError("truncated record")
        fh.read((4 - length % 4) % 4)
        parts.append(data)
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts)


def unpack(record: bytes) -> tuple[float, bytes]:
    """(first label, image bytes) of an image record."""
    if len(record) < _HEADER.size:
        raise ValueError("record shorter than its header")
    flag, label, _, _ = _HEADER.unpack_from(record)
    payload = record[_HEADER.size:]
    if flag > 0:
        label = struct.unpack_from("<f", payload)[0]
        payload = payload[4 * flag:]
    return label, payload
