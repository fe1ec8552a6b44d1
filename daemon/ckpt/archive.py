"""A checkpoint's archive checked before anything of it is loaded: torch's zip container, its
directory consistent with the file, and every record's CRC-32.

Verifying the CRCs reads every byte a record claims, and zipfile reads the central directory into
memory whole: so the directory is checked against the file's size first, and a file that claims
more than it holds (a sparse 50 GB file named like a checkpoint) is refused without being read.
"""

from __future__ import annotations

import os
import struct
import zipfile
from typing import BinaryIO

from daemon.ckpt.schema import InvalidCheckpoint

# The zip records that end an archive as torch writes it: no archive comment, so the end record is
# the file's last bytes, preceded by the zip64 ones when the archive needs them.
END_RECORD = struct.Struct("<4s4H2LH")  # signature, disks, entries, directory size and offset, comment
ZIP64_LOCATOR = struct.Struct("<4sLQL")
ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")  # ..., entries, directory size and offset
LOCAL_HEADER_BYTES = 30  # a record's header before its name
# Read into memory by zipfile before any check: about 2 million records of a torch archive, far
# more tensors than a model's state holds.
MAX_DIRECTORY_BYTES = 256 << 20


def verify_archive(file: BinaryIO) -> None:
    """The archive is torch's and every record's CRC-32 holds; its directory is checked first, since
    verifying reads every byte a record claims."""
    try:
        size = os.fstat(file.fileno()).st_size
        directory_offset = _directory_offset(file, size)
        with zipfile.ZipFile(file) as archive:
            _check_records(archive.infolist(), directory_offset)
            corrupt_record = archive.testzip()
    except zipfile.BadZipFile as exc:
        raise InvalidCheckpoint(f"incomplete or not a checkpoint archive ({exc})") from None
    except (OSError, EOFError, ValueError) as exc:
        raise InvalidCheckpoint(f"unreadable ({type(exc).__name__}: {exc})") from None
    if corrupt_record is not None:
        raise InvalidCheckpoint(f"checksum mismatch in record {corrupt_record}")


def _read_at(file: BinaryIO, offset: int, record: struct.Struct) -> tuple:
    file.seek(offset)
    data = file.read(record.size)
    if len(data) != record.size:
        raise zipfile.BadZipFile("end of archive record missing")
    return record.unpack(data)


def _directory_offset(file: BinaryIO, size: int) -> int:
    """Where the central directory starts, from the end records: it must end where they begin and
    be of a bounded size (zipfile reads it into memory whole). Raises BadZipFile."""
    end_offset = size - END_RECORD.size
    if end_offset < 0:
        raise zipfile.BadZipFile("shorter than an archive's end record")
    signature, *_, directory_bytes, directory_offset, comment_bytes = _read_at(file, end_offset, END_RECORD)
    if signature != b"PK\x05\x06" or comment_bytes:
        raise zipfile.BadZipFile("no end of archive record at the end of the file")
    locator_offset = end_offset - ZIP64_LOCATOR.size
    if locator_offset >= 0 and _read_at(file, locator_offset, ZIP64_LOCATOR)[0] == b"PK\x06\x07":
        end_offset = locator_offset - ZIP64_END_RECORD.size
        if end_offset < 0:
            raise zipfile.BadZipFile("zip64 end of archive record missing")
        signature, *_, directory_bytes, directory_offset = _read_at(file, end_offset, ZIP64_END_RECORD)
        if signature != b"PK\x06\x06":
            raise zipfile.BadZipFile("zip64 end of archive record missing")
    if directory_offset + directory_bytes != end_offset:
        raise zipfile.BadZipFile(
            f"the directory claims {directory_bytes} bytes at offset {directory_offset}, "
            f"the file holds {end_offset - directory_offset} there"
        )
    if directory_bytes > MAX_DIRECTORY_BYTES:
        raise zipfile.BadZipFile(f"a directory of {directory_bytes} bytes, more than {MAX_DIRECTORY_BYTES}")
    return directory_offset


def _check_records(records: list[zipfile.ZipInfo], directory_offset: int) -> None:
    """What the directory says of the records fits the file and is what torch writes: every record
    stored (verifying a compressed one inflates it), within the bytes before the directory, and a
    `data.pkl` under one top folder. Raises BadZipFile."""
    claimed = 0
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED or record.compress_size != record.file_size:
            raise zipfile.BadZipFile(f"record {record.filename} is compressed; torch stores every record")
        data_end = record.header_offset + LOCAL_HEADER_BYTES + len(record.filename) + record.compress_size
        claimed += record.compress_size
        if data_end > directory_offset or claimed > directory_offset:
            raise zipfile.BadZipFile(
                f"record {record.filename} claims {record.compress_size} bytes, more than the file holds"
            )
    folder = records[0].filename.split("/", 1)[0] if records else ""
    names = {record.filename for record in records}
    if f"{folder}/data.pkl" not in names or any(not name.startswith(f"{folder}/") for name in names):
        raise zipfile.BadZipFile("not a torch archive (no data.pkl in one top folder)")
