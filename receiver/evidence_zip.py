"""Reading an untrusted evidence bundle's members, bounded.

:class:`Source` holds the members of a bundle, from the zip or from a folder
it was unpacked into: their names (as often as each occurs), the sizes
declared, and those never read (compressed, encrypted, with two sizes, or
whose bytes overlap another member's). A member is read a chunk at a time and
never past the limit its caller gives, and all of a zip's members together
never past the size of the archive (each member counted once, however often
it is read): whatever a damaged or hostile zip raises becomes
:class:`MemberError`, and a bundle that cannot be opened at all
:class:`BundleInputError`.

A zip is laid out as the exporter writes it or :attr:`Source.layout` says
how it is not: its first member's local header at offset 0, each member's
data followed at once by the next member's header, the central directory
right after the last member, then the end record (and the zip64 records
before it, for a large bundle) ending the file, with no comment. Bytes
before, between or after the members are what another reader (one that
walks the local headers from the start, as a streaming unzipper does) may
take for the bundle instead.
:func:`strict_json` parses JSON without NaN, Infinity or deep nesting.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO, Final

from receiver.evidence_format import safe_name

__all__ = [
    "MAX_KEY_FILE",
    "MAX_MANIFEST_BYTES",
    "BundleInputError",
    "MemberError",
    "Source",
    "shallow",
    "strict_json",
]

MAX_MANIFEST_BYTES: Final = 16 * 1024 * 1024
MAX_SMALL_FILE: Final = 256 * 1024 * 1024
MAX_KEY_FILE: Final = 64 * 1024
_STORED: Final = "the exporter stores every member as it is"
_LOCAL_HEADER: Final = struct.Struct("<4s22xHH")  # signature, name and extra lengths
_END: Final = struct.Struct("<4s18x")  # signature; the rest as zipfile reads it
_END64_LOCATOR: Final = struct.Struct("<4sIQI")
_END64: Final = struct.Struct("<4sQHHIIQQQQ")  # zipfile assumes no extensible data too
#: Nothing in a bundle nests JSON half as deep.
MAX_JSON_DEPTH: Final = 64
_JSON_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"')
_DEPTH_STEP: Final = [1 if c in b"[{" else -1 if c in b"]}" else 0 for c in range(256)]


class BundleInputError(ValueError):
    """The bundle cannot be read at all (not a zip or a folder, unreadable): exit 2."""


class MemberError(Exception):
    """A member cannot be read (damaged, refused, larger than allowed)."""


#: What reading a zip member may raise besides OSError (a damaged or hostile zip).
_ZIP_ERRORS: Final = (
    zipfile.BadZipFile,
    OSError,
    EOFError,
    RuntimeError,
    NotImplementedError,
    ValueError,
    zlib.error,
    lzma.LZMAError,
)


class Source:
    """The members of a bundle, from a zip or a folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        #: Every member name, as often as it occurs.
        self.names: list[str] = []
        #: Size as the zip (or the file system) declares it.
        self.sizes: dict[str, int] = {}
        #: Members that are never read, and why (compressed, encrypted, overlapping).
        self.refused: dict[str, str] = {}
        #: How the zip is not laid out as the exporter writes it (empty: as it does).
        self.layout: list[str] = []
        #: Bytes all members may give together (a zip's size; None: a folder), and the
        #: bytes each member gave at most so far.
        self._budget: int | None = None
        self._given: dict[str, int] = {}
        self._total = 0
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file():
                    name = p.relative_to(path).as_posix()
                    self.names.append(name)
                    self.sizes[name] = p.stat().st_size
        elif path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise BundleInputError(f"{path}: not a zip file ({exc})") from exc
            except UnicodeDecodeError as exc:
                raise BundleInputError(
                    f"{path}: a member's name is marked UTF-8 but is not ({exc}): "
                    "not a bundle the exporter wrote"
                ) from exc
            except _ZIP_ERRORS as exc:
                raise BundleInputError(f"{path}: not a readable zip file ({exc})") from exc
            for info in self._zip.infolist():
                name = info.filename
                if info.is_dir() and info.file_size == 0:
                    continue
                self.names.append(name)
                self.sizes[name] = info.file_size
                if info.flag_bits & 0x1:
                    self.refused[name] = f"encrypted: {_STORED}"
                elif info.compress_type != zipfile.ZIP_STORED:
                    self.refused[name] = f"compressed (zip method {info.compress_type}): {_STORED}"
                elif info.compress_size != info.file_size:
                    self.refused[name] = f"its two sizes in the zip differ: {_STORED}"
                else:
                    self.refused.pop(name, None)
            try:
                self._check_layout(path)
            except OSError as exc:
                raise BundleInputError(f"{path}: cannot be read ({exc})") from exc
        else:
            raise BundleInputError(f"{path}: no such file or folder")
        self.present = set(self.names)
        self.counts = Counter(self.names)

    def _check_layout(self, path: Path) -> None:
        """Fill :attr:`layout` (how the zip is not as the exporter writes it) and refuse
        every member whose bytes run into the next member's (a zip bomb makes many members
        of the same bytes)."""
        assert self._zip is not None
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            self._budget = size
            self._check_end(fh, size)
            members = sorted(self._zip.infolist(), key=lambda i: i.header_offset)
            at = 0  # where the next member's header should be
            for i, info in enumerate(members):
                nxt = members[i + 1] if i + 1 < len(members) else None
                stop = self._zip.start_dir if nxt is None else nxt.header_offset
                name = info.filename[:200]
                if info.header_offset > at:
                    where = "before the zip's first member" if i == 0 else f"before {name}"
                    self.layout.append(
                        f"{info.header_offset - at} bytes {where} that no member holds: a "
                        "reader that walks the zip from its start may take them for the bundle"
                    )
                fh.seek(info.header_offset)
                header = fh.read(_LOCAL_HEADER.size)
                if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                    self.refused[info.filename] = "no local header where the zip says it is"
                    at = max(at, stop)
                    continue
                _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
                data_end = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
                data_end += info.compress_size
                if data_end > stop:
                    what = "the zip's directory" if nxt is None else f"{nxt.filename[:200]}"
                    self.refused[info.filename] = (
                        f"its bytes in the zip run {data_end - stop} bytes into {what}: members "
                        "that overlap (so many members can be made of the same bytes)"
                    )
                at = max(at, data_end)
            if at < self._zip.start_dir:
                self.layout.append(
                    f"{self._zip.start_dir - at} bytes after the zip's last member that no "
                    "member holds"
                )

    def _check_end(self, fh: BinaryIO, size: int) -> None:
        """The end record ends the file, without a comment (zip64's records before it)."""
        end = size - _END.size
        fh.seek(max(end, 0))
        record = fh.read(_END.size)
        if len(record) != _END.size or record[:4] != b"PK\x05\x06" or record[-2:] != b"\0\0":
            self.layout.append(
                "bytes after the zip's end record (or a comment): not as the exporter writes "
                "a bundle"
            )
            return
        if end >= _END64_LOCATOR.size + _END64.size:
            fh.seek(end - _END64_LOCATOR.size)
            locator = _END64_LOCATOR.unpack(fh.read(_END64_LOCATOR.size))
            start = end - _END64_LOCATOR.size - _END64.size
            fh.seek(start)
            if locator[0] == b"PK\x06\x07" and (locator[2] != start or fh.read(4) != b"PK\x06\x06"):
                self.layout.append("its zip64 end record is not right before its locator")

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def holds(self, name: str) -> bool:
        """Whether the bundle has a member ``name`` with a safe name (the checks of the
        members report one missing or unsafe: the others pass it over)."""
        return name in self.present and safe_name(name)

    def chunks(self, name: str, limit: int) -> Iterator[bytes]:
        """A member's bytes, 1 MiB at a time; MemberError when it cannot be read (or when it
        is larger than ``limit``), possibly after some chunks."""
        if name in self.refused:
            raise MemberError(f"not read: {self.refused[name]}")
        size = 0
        try:
            zf = self._zip
            with zf.open(name) if zf is not None else (self.path / name).open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise MemberError(f"larger than {limit} bytes; not read further")
                    self._count(name, size)
                    yield chunk
        except _ZIP_ERRORS as exc:
            raise MemberError(f"damaged in the zip: {exc}") from exc

    def _count(self, name: str, size: int) -> None:
        """Count ``size`` bytes read of member ``name`` (each member once, at its most):
        MemberError once the members together gave more than the archive holds."""
        if self._budget is None or size <= (given := self._given.get(name, 0)):
            return
        self._given[name] = size
        self._total += size - given
        if self._total > self._budget:
            raise MemberError(
                f"the members read so far hold more bytes ({self._total}) than the whole "
                f"zip ({self._budget}): members that overlap; not read further"
            )

    def read(self, name: str, limit: int) -> bytes:
        """A member's bytes; MemberError if larger than ``limit`` or unreadable."""
        return b"".join(self.chunks(name, limit))

    def sha256(self, name: str, limit: int) -> tuple[str, int]:
        """SHA-256 and size of a member; MemberError if it cannot be read (or exceeds
        ``limit``)."""
        h, size = hashlib.sha256(), 0
        for chunk in self.chunks(name, limit):
            h.update(chunk)
            size += len(chunk)
        return h.hexdigest(), size

    def lines(self, name: str, limit: int) -> Iterator[tuple[int, bytes | None]]:
        """``(number, line)`` of a member read a chunk at a time (``None``: a line longer
        than ``limit``); MemberError if it cannot be read."""
        number, buf, long = 0, bytearray(), False
        for chunk in self.chunks(name, MAX_SMALL_FILE):
            start = 0
            while (end := chunk.find(b"\n", start)) >= 0:
                number += 1
                if not long:
                    buf += chunk[start:end]
                yield number, None if long or len(buf) > limit else bytes(buf)
                buf.clear()
                long, start = False, end + 1
            if not long:
                buf += chunk[start:]
                if len(buf) > limit:
                    long = True
                    buf.clear()
        if buf or long:
            yield number + 1, None if long else bytes(buf)

    def local(self, name: str, folder: Path, limit: int) -> Path:
        """A path to the member on disk (copied out of a zip, at most ``limit`` bytes;
        MemberError if it is larger or damaged there)."""
        if self._zip is None:
            return self.path / name
        dest = folder / name.replace("/", "__")
        try:
            with dest.open("wb") as out:
                for chunk in self.chunks(name, limit):
                    out.write(chunk)
        except MemberError:
            dest.unlink(missing_ok=True)
            raise
        return dest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def shallow(data: bytes) -> None:
    """ValueError if JSON ``data`` nests deeper than :data:`MAX_JSON_DEPTH` (checked before
    parsing: a parser at the recursion limit breaks whatever else runs then, finalizers)."""
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return
    bare = _JSON_STRING.sub(b"", data)
    if max(accumulate(map(_DEPTH_STEP.__getitem__, bare)), default=0) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")


def strict_json(data: bytes) -> Any:
    """Strict JSON (no NaN or Infinity, not deeply nested); ValueError for anything else."""
    shallow(data)
    try:
        return json.loads(data, parse_constant=_no_constant)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc
