"""Sparse zip64 files named like checkpoints: huge on paper, a few blocks on disk. One stored record
at the start, a hole, and the directory at the end, each part claiming what the test needs."""

from __future__ import annotations

import struct
from pathlib import Path

LOCAL_HEADER = struct.Struct("<4s5H3L2H")
LOCAL_ZIP64 = struct.Struct("<2H2Q")  # sizes
CENTRAL_HEADER = struct.Struct("<4s6H3L5H2L")
CENTRAL_ZIP64 = struct.Struct("<2H3Q")  # sizes and the record's offset
ZIP64_END = struct.Struct("<4sQ2H2L4Q")
ZIP64_LOCATOR = struct.Struct("<4sLQL")
END = struct.Struct("<4s4H2LH")
MAX32, MAX16, ZIP64_VERSION = 0xFFFFFFFF, 0xFFFF, 45

GIB = 1 << 30
TIB = 1 << 40


def sparse_zip64(
    path: Path, size: int, *, name: str = "archive/data.pkl", claims: int | None = None, whole_file_directory=False
) -> None:
    """A `size`-byte sparse file whose one stored record `name` claims `claims` bytes (None: every
    byte up to the directory, so that it fits). `whole_file_directory`: the end record says that
    the directory is the whole file instead."""
    encoded = name.encode()
    local = LOCAL_HEADER.pack(b"PK\x03\x04", ZIP64_VERSION, 0, 0, 0, 0, 0, MAX32, MAX32, len(encoded), LOCAL_ZIP64.size)
    data_start = len(local) + len(encoded) + LOCAL_ZIP64.size
    central_size = CENTRAL_HEADER.size + len(encoded) + CENTRAL_ZIP64.size
    directory_offset = size - central_size - ZIP64_END.size - ZIP64_LOCATOR.size - END.size
    claimed = directory_offset - data_start if claims is None else claims
    central = CENTRAL_HEADER.pack(
        b"PK\x01\x02", ZIP64_VERSION, ZIP64_VERSION, 0, 0, 0, 0, 0, MAX32, MAX32,
        len(encoded), CENTRAL_ZIP64.size, 0, 0, 0, 0, MAX32,
    )  # fmt: skip
    end_records = directory_offset + central_size
    directory_at, directory_size = (0, end_records) if whole_file_directory else (directory_offset, central_size)
    with open(path, "wb") as file:
        file.write(local + encoded + LOCAL_ZIP64.pack(1, 16, claimed, claimed))
        file.truncate(directory_offset)  # the hole: no block on disk, zeros when read
        file.seek(directory_offset)
        file.write(central + encoded + CENTRAL_ZIP64.pack(1, 24, claimed, claimed, 0))
        file.write(
            ZIP64_END.pack(b"PK\x06\x06", 44, ZIP64_VERSION, ZIP64_VERSION, 0, 0, 1, 1, directory_size, directory_at)
        )
        file.write(ZIP64_LOCATOR.pack(b"PK\x06\x07", 0, end_records, 1))
        file.write(END.pack(b"PK\x05\x06", 0, 0, MAX16, MAX16, MAX32, MAX32, 0))
    assert path.stat().st_size == size
