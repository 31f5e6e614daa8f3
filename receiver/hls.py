"""HLS playlists of recorded sessions (RFC 8216, version 7, fragmented MP4).

Routes added by :func:`setup_hls`:

- ``GET /hls/{session}/{camera}.m3u8`` — a camera's media playlist.
- ``GET /hls/{session}/{camera}.{first_seq}.mp4`` — a part file's durable
  bytes, with HTTP range support: the playlist's init segments
  (``EXT-X-MAP`` with ``BYTERANGE``) and media segments (``EXT-X-BYTERANGE``)
  are byte ranges of the part files as they lie on disk.

So ``vlc``/``ffplay https://RECEIVER/hls/SESSION/CAMERA.m3u8`` plays a
recording, and a video management system can ingest it: with the login
cookie, or with a player link (``...m3u8?t=TOKEN``, :mod:`receiver.player_links`),
in which case every URI the playlist lists carries the same ``?t=TOKEN``.

The playlist. Each part file holding durable frames contributes its init
segment and media segments cut at keyframes (:class:`SegmentCutter`: a
segment ends at the first keyframe once it holds :data:`SEGMENT_TARGET_S`;
a GOP longer than :data:`SEGMENT_MAX_S` is cut at a frame). Parts follow
each other in seq order, with ``EXT-X-DISCONTINUITY`` between two parts (a
new init segment; a hole, when seqs are missing or declared lost, lies
always between parts). ``EXT-X-PROGRAM-DATE-TIME`` of each segment is the
capture time of its first frame; ``EXTINF`` the sum of its samples'
durations. Only durable (fsynced) fragments are listed: the playlist is
read from the recording index (:mod:`receiver.index`).

While the camera records, the playlist is an ``EVENT`` playlist that only
grows: it lists footage in seq order up to the camera's cumulative durable
seq (everything before it is held or declared lost, so nothing can be
inserted before what was listed), never a segment that may still grow, and
no part that arrives inside a range the device declared lost (late
footage). Once the camera stops recording (the session closed, or the
receiver restarted) every durable part is listed, and a closed session's
playlist ends with ``EXT-X-ENDLIST``. ``EXT-X-TARGETDURATION`` is
:data:`SEGMENT_MAX_S`, which no segment exceeds (it must not change while
the playlist grows, and ending it is only allowed to append the ENDLIST).

One timeline. Every part file starts its decode times at 0, and players
(FFmpeg's HLS demuxer, for one) drop or misplace frames when timestamps go
back at a discontinuity. The segment route therefore rebases each
fragment's ``tfdt`` (``baseMediaDecodeTime``, 8 bytes, the only bytes
changed) onto capture time: decode time = UTC capture time in the track's
timescale, so media time and ``PROGRAM-DATE-TIME`` agree and a hole is a
jump forward by its real length. The files are never changed, and the
viewer's ``/recordings/...`` and the district export serve or read them as
stored.

Accountability. Whoever admitted a request (the login audit of
:mod:`receiver.police_api`, the player-link gate of :mod:`receiver.player_links`)
says what to record with :func:`on_sending`: it is called just before a
playlist or footage is sent (a 200 or 206 answer to a ``GET``), never after, so
a player that hangs up mid-transfer is on the access log all the same; it
answers whether the answer may go (:class:`receiver.access_log.FootageLog`:
not before its entry is durable; else 503 ``access_log_unavailable``). A part
transfer under way is cut (its connection dropped) when what admitted it no
longer would: a login by the viewer's :class:`receiver.viewer.LoginWatch`, as
``/recordings/...``; a player link by its own re-check (:func:`watch_transfer`).

Errors are JSON ``{"error": CODE, "detail": "..."}`` (400 ``invalid_id``,
404 ``unknown_session`` / ``unknown_camera`` / ``unknown_recording``, 416
``bad_range``, 503 ``access_log_unavailable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiohttp import web

from receiver.accounts import Role
from receiver.auth import LINK_PARAM, current_user, link_token
from receiver.errors import InvalidIdError, ReceiverError
from receiver.fmp4 import FragmentInfo
from receiver.index import LocalStorage
from receiver.recording import RecordingStore
from receiver.storage import CameraEntry, PartEntry, RecordingStorage, SessionEntry
from receiver.summaries import parse_part_file, validate_camera_id, validate_session_id
from receiver.viewer import LOGIN_WATCH_KEY, Cut, TransferCut, until_cut

__all__ = [
    "SEGMENT_MAX_S",
    "SEGMENT_TARGET_S",
    "STORAGE_KEY",
    "Segment",
    "SegmentCutter",
    "Watch",
    "on_sending",
    "render_playlist",
    "requested_camera",
    "setup_hls",
    "timeline_shift",
    "watch_transfer",
]

#: A segment ends at the first keyframe once it holds this many seconds.
SEGMENT_TARGET_S = 2.0
#: No segment grows beyond this (a longer GOP is cut at a frame); the target duration
#: of a playlist that may grow.
SEGMENT_MAX_S = 6

#: The storage the HLS routes read (the viewer may share it).
STORAGE_KEY: web.AppKey[RecordingStorage] = web.AppKey("breakglass.hls.storage")
_CUTTERS_KEY: web.AppKey[OrderedDict[tuple[str, str], SegmentCutter]] = web.AppKey(
    "breakglass.hls.cutters"
)
#: Parts whose segment lists are kept in memory (least recently used go first).
_CUTTERS_KEPT = 1024
#: Bytes read (and sent) at a time by the segment route.
_CHUNK = 1 << 20

#: What cuts a part transfer under way: entered for the transfer, its future resolves (with
#: why) when the transfer must stop.
Watch = Callable[[], AbstractContextManager[asyncio.Future[Cut]]]
#: Called just before an answer is sent: whether it may be (its access-log entry durable).
Audit = Callable[[web.Request], Awaitable[bool]]
_SENDING_KEY: web.RequestKey[list[Audit]] = web.RequestKey("breakglass.hls.sending")
_WATCH_KEY: web.RequestKey[Watch] = web.RequestKey("breakglass.hls.watch")

_URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")
_PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# -- segments (sans-IO) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """One media segment: consecutive fragments of one part file."""

    offset: int
    size: int
    #: Index of its first sample in the part (its seq is the part's first seq + this).
    first_sample: int
    samples: int
    #: Decode time of its first sample and its duration, in the track's timescale.
    start: int
    duration: int
    keyframe: bool

    @property
    def end_sample(self) -> int:
        """Index of the sample after its last one."""
        return self.first_sample + self.samples


class SegmentCutter:
    """Cuts one part's fragments into media segments, as they are fed (sans-IO).

    Deterministic and incremental: the segments it closed never change when
    more fragments come, so a growing part's playlist only grows. The last,
    :attr:`pending` segment is closed by the next fragment, or is complete
    when the part is final.
    """

    def __init__(
        self,
        timescale: int,
        init_size: int,
        *,
        target_s: float = SEGMENT_TARGET_S,
        max_s: float = SEGMENT_MAX_S,
    ) -> None:
        if timescale <= 0 or not 0 < target_s <= max_s:
            raise ValueError(f"bad segment settings: {timescale}, {target_s}, {max_s}")
        self.timescale = timescale
        self.init_size = init_size
        # Less 1 %: capture clocks are not exact (60 frames at 33 333 µs are 1 tick short
        # of 2 s), and a segment should not swallow a whole further GOP for that.
        self._target = round(target_s * timescale * 0.99)
        self._max = round(max_s * timescale)
        #: Closed segments, in file order.
        self.segments: list[Segment] = []
        self._open: list[FragmentInfo] = []
        self._open_duration = 0
        self._samples = 0
        #: The offset just past the last fragment fed (the init's end before any).
        self.end = init_size

    def feed(self, fragments: Iterable[FragmentInfo]) -> None:
        """Add fragments in file order; ones already fed are skipped."""
        for frag in fragments:
            if frag.offset < self.end:
                continue
            if frag.offset != self.end:
                raise ValueError(f"fragment at {frag.offset}, expected one at {self.end}")
            if self._open and (
                (frag.keyframe and self._open_duration >= self._target)
                or self._open_duration + frag.duration > self._max
            ):
                self.segments.append(self._close())
            self._open.append(frag)
            self._open_duration += frag.duration
            self.end = frag.end

    @property
    def pending(self) -> Segment | None:
        """The segment still open (complete only if the part is final)."""
        return self._segment(self._open) if self._open else None

    def _close(self) -> Segment:
        seg = self._segment(self._open)
        self._samples += seg.samples
        self._open = []
        self._open_duration = 0
        return seg

    def _segment(self, frags: list[FragmentInfo]) -> Segment:
        return Segment(
            offset=frags[0].offset,
            size=frags[-1].end - frags[0].offset,
            first_sample=self._samples,
            samples=sum(f.samples for f in frags),
            start=frags[0].decode_time,
            duration=sum(f.duration for f in frags),
            keyframe=frags[0].keyframe,
        )


def timeline_shift(part: PartEntry) -> int:
    """What the segment route adds to each decode time of ``part``: capture time in ticks.

    The part's first sample then decodes at its UTC capture time (in the
    track's timescale); without a saved capture time, at the part's
    ``mvhd`` creation time (whole seconds).
    """
    origin_us = part.first_capture_us
    if origin_us is None:
        origin_us = part.created_us or 0
    origin = (origin_us * part.timescale + 500_000) // 1_000_000
    return max(origin - part.base_time, -part.base_time)


def _capture_us(part: PartEntry, decode_time: int) -> int | None:
    if part.first_capture_us is None:
        return None
    return part.first_capture_us + (decode_time - part.base_time) * 1_000_000 // part.timescale


def _date_time(us: int) -> str:
    """ISO 8601 UTC with milliseconds (rounded), as players expect it."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=(us + 500) // 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def render_playlist(
    parts: list[tuple[PartEntry, list[Segment]]], *, ended: bool, token: str | None = None
) -> str:
    """The media playlist of ``parts`` (each with its listed segments), in seq order.

    ``ended``: nothing more will come (``EXT-X-ENDLIST``). ``token``: the player
    link the playlist was fetched with (URL-safe characters only), added as
    ``?t=`` to every URI listed, so a player fetches the segments with it. The target
    duration is :data:`SEGMENT_MAX_S` (or the longest segment, rounded, if a
    single frame lasted longer): a playlist that grows must never change it,
    and a closed one was a growing one before.
    """
    if token is not None and _URL_SAFE.fullmatch(token) is None:
        raise ValueError("a player link token has URL-safe characters only")
    query = "" if token is None else f"?{LINK_PARAM}={token}"
    body: list[str] = []
    longest = SEGMENT_MAX_S
    first = True
    for part, segments in parts:
        if not segments:
            continue
        if not first:
            body.append("#EXT-X-DISCONTINUITY")
        first = False
        uri = part.file + query
        body.append(f'#EXT-X-MAP:URI="{uri}",BYTERANGE="{part.init_size}@0"')
        for seg in segments:
            captured = _capture_us(part, seg.start)
            if captured is not None:
                body.append(f"#EXT-X-PROGRAM-DATE-TIME:{_date_time(captured)}")
            millis = (seg.duration * 1000 + part.timescale // 2) // part.timescale
            longest = max(longest, (millis + 500) // 1000)  # EXTINF rounded to the nearest
            body.append(f"#EXTINF:{millis // 1000}.{millis % 1000:03d},")
            body.append(f"#EXT-X-BYTERANGE:{seg.size}@{seg.offset}")
            body.append(uri)
    head = [
        "#EXTM3U",
        "#EXT-X-VERSION:7",
        f"#EXT-X-TARGETDURATION:{longest}",
        "#EXT-X-MEDIA-SEQUENCE:0",
        "#EXT-X-PLAYLIST-TYPE:EVENT",
    ]
    tail = ["#EXT-X-ENDLIST"] if ended else []
    return "\n".join([*head, *body, *tail]) + "\n"


def _listed(
    camera: CameraEntry, part: PartEntry, cutter: SegmentCutter
) -> tuple[bool, list[Segment]]:
    """Whether ``part`` belongs in the playlist now, and its segments that do."""
    segments = list(cutter.segments)
    pending = cutter.pending
    if part.final and pending is not None:
        segments.append(pending)
    if not camera.recording:
        return True, segments
    # Growing (EVENT) playlist: only settled footage, so nothing is ever inserted.
    cap = camera.durable_seq
    if part.first_seq > cap or camera.in_declared_gap(part.first_seq):
        return False, []
    return True, [s for s in segments if part.first_seq + s.end_sample - 1 <= cap]


# -- routes --------------------------------------------------------------------------


def on_sending(request: web.Request, audit: Audit) -> None:
    """Have the HLS route await ``audit(request)`` just before it sends a playlist or
    footage (a 200 or 206 answer to a GET; not for an error, nor a HEAD); ``False``
    withholds the answer (503 ``access_log_unavailable``)."""
    if _SENDING_KEY not in request:
        request[_SENDING_KEY] = []
    request[_SENDING_KEY].append(audit)


def watch_transfer(request: web.Request, watch: Watch) -> None:
    """Cut the part transfer of ``request`` by ``watch`` (instead of its login's watch)."""
    request[_WATCH_KEY] = watch


async def _withheld(request: web.Request) -> web.Response | None:
    """Await the audits of :func:`on_sending`; the error to answer if one withholds."""
    for audit in request.get(_SENDING_KEY, ()):
        if not await audit(request):
            detail = "the access log cannot be written now: no footage is sent without it"
            return _error(503, "access_log_unavailable", detail)
    return None


def _watch(request: web.Request) -> AbstractContextManager[asyncio.Future[Cut] | None]:
    """What may cut this request's part transfer: its own watch, else its login's."""
    if _WATCH_KEY in request:
        return request[_WATCH_KEY]()
    logins = request.app.get(LOGIN_WATCH_KEY)
    if logins is not None and current_user(request) is not None:
        return logins.watch(request, Role.OFFICER)
    return contextlib.nullcontext()


def setup_hls(
    app: web.Application,
    store: RecordingStore,
    *,
    storage: RecordingStorage | None = None,
    index_path: Path | None = None,
) -> None:
    """Add the HLS routes to ``app``.

    Without ``storage``, a :class:`LocalStorage` over ``store`` (SQLite index
    at ``index_path``, default ``<store root>/.index.sqlite``) is opened when
    the application starts and closed when it stops (``cleanup_ctx``): the
    store must be loaded before the application starts.
    """
    if storage is None:
        local = LocalStorage(store, index_path)
        storage = local

        async def lifetime(_app: web.Application) -> AsyncIterator[None]:
            async with local:
                yield

        app.cleanup_ctx.append(lifetime)
    app[STORAGE_KEY] = storage
    app[_CUTTERS_KEY] = OrderedDict()
    app.router.add_get("/hls/{session}/{camera}.m3u8", _playlist)
    app.router.add_get("/hls/{session}/{file}", _part_bytes)


def _error(status: int, code: str, detail: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": code, "detail": detail}, status=status, headers={**_HEADERS, **headers}
    )


def _from_exception(exc: ReceiverError) -> web.Response:
    return _error(400 if isinstance(exc, InvalidIdError) else 404, exc.code, str(exc))


async def _cutter(
    app: web.Application, storage: RecordingStorage, session_id: str, part: PartEntry
) -> SegmentCutter:
    """The part's cutter, fed with every durable fragment the index holds."""
    cutters = app[_CUTTERS_KEY]
    key = (session_id, part.file)
    cutter = cutters.get(key)
    if cutter is None or cutter.end > part.durable_size or cutter.init_size != part.init_size:
        cutter = SegmentCutter(part.timescale, part.init_size)
    cutters[key] = cutter
    cutters.move_to_end(key)
    while len(cutters) > _CUTTERS_KEPT:
        cutters.popitem(last=False)
    if cutter.end < part.durable_size:
        # Two requests may feed the same cutter; it skips what it has already.
        cutter.feed(await storage.fragments(session_id, part.file, cutter.end))
    return cutter


async def requested_camera(request: web.Request) -> tuple[SessionEntry, CameraEntry]:
    """The recording of the route's ``{session}`` and ``{camera}``; a ReceiverError if none."""
    storage = request.app[STORAGE_KEY]
    session = await storage.session(validate_session_id(request.match_info["session"]))
    return session, session.camera(validate_camera_id(request.match_info["camera"]))


async def _playlist(request: web.Request) -> web.Response:
    storage = request.app[STORAGE_KEY]
    try:
        session, camera = await requested_camera(request)
        session_id, camera_id = session.session_id, camera.camera_id
        parts = await storage.parts(session_id, camera_id)
    except ReceiverError as exc:
        return _from_exception(exc)
    listed: list[tuple[PartEntry, list[Segment]]] = []
    for part in parts:
        cutter = await _cutter(request.app, storage, session_id, part)
        keep, segments = _listed(camera, part, cutter)
        if keep:
            listed.append((part, segments))
    ended = (
        session.closed_at is not None and not camera.recording and all(part.final for part in parts)
    )
    text = render_playlist(listed, ended=ended, token=link_token(request))
    response = web.Response(text=text, content_type=_PLAYLIST_TYPE, headers=_HEADERS)
    if request.method == "GET" and (withheld := await _withheld(request)) is not None:
        return withheld
    return response


def _patch_decode_times(
    data: bytearray, start: int, fragments: list[FragmentInfo], shift: int
) -> None:
    """Rebase the ``tfdt`` fields inside ``data`` (file bytes from ``start``) by ``shift``."""
    stop = start + len(data)
    for frag in fragments:
        at = frag.decode_time_at
        if at < 0 or at + 8 <= start or at >= stop:
            continue
        value = struct.pack(">Q", frag.decode_time + shift)
        lo, hi = max(at, start), min(at + 8, stop)
        data[lo - start : hi - start] = value[lo - at : hi - at]


async def _part_bytes(request: web.Request) -> web.StreamResponse:
    storage = request.app[STORAGE_KEY]
    file = request.match_info["file"]
    try:
        session_id = validate_session_id(request.match_info["session"])
        if parse_part_file(file) is None:
            return _error(404, "unknown_recording", f"no recording file {file!r}")
        part = await storage.part(session_id, file)
    except ReceiverError as exc:
        return _from_exception(exc)
    size = part.durable_size
    unsatisfiable = {"Content-Range": f"bytes */{size}"}
    try:
        wanted = request.http_range
    except ValueError as exc:
        return _error(416, "bad_range", f"Range header: {exc}", **unsatisfiable)
    if wanted.start is None:
        start, stop, status = 0, size, 200
    else:
        if wanted.start < 0:  # a suffix: the last N bytes
            start, stop = max(0, size + wanted.start), size
        else:
            start, stop = wanted.start, size if wanted.stop is None else min(wanted.stop, size)
        status = 206
        if start >= stop:
            return _error(416, "bad_range", f"{file} has {size} durable bytes", **unsatisfiable)
    headers = {**_HEADERS, "Content-Type": "video/mp4", "Accept-Ranges": "bytes"}
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = stop - start
    if request.method == "HEAD":
        await response.prepare(request)
        return response
    if (withheld := await _withheld(request)) is not None:  # the log first: before a
        return withheld  # byte of footage leaves
    with _watch(request) as cut:
        sending = _send(request, response, session_id, part, (start, stop))
        if cut is None:
            await sending
        else:
            # Cut: the connection is dropped already; aiohttp sees a client gone.
            with contextlib.suppress(TransferCut):
                await until_cut(request, cut, sending)
    return response


async def _send(
    request: web.Request,
    response: web.StreamResponse,
    session_id: str,
    part: PartEntry,
    span: tuple[int, int],
) -> None:
    """Send bytes ``span`` (start, stop) of ``part``, its decode times rebased."""
    storage = request.app[STORAGE_KEY]
    file, (start, stop) = part.file, span
    await response.prepare(request)
    shift = timeline_shift(part)
    pos = start
    while pos < stop:
        end = min(stop, pos + _CHUNK)
        data = bytearray(await storage.read(session_id, file, pos, end))
        _patch_decode_times(data, pos, await storage.fragments(session_id, file, pos, end), shift)
        await response.write(bytes(data))
        pos = end
    await response.write_eof()
