"""Benchmark ``store``: what the sealed segment store costs in disk bytes, start-up and CPU.

Three figures, each with a peer measured in the same run:

- ``store_write_amplification``: bytes of sealed segments on disk per byte of
  media, for a 1080p30 ~4 Mbit/s H.264 stream (PyAV libx264, from the
  benchmark cache) replayed into a :class:`~agent.store.SegmentStore`
  (4 s segments, sealed to two age recipients) as fast as the writer takes
  it. Peer: ``ffmpeg -c copy -f segment -segment_time 4`` (MPEG-TS segments)
  writing the same stream, its segment bytes per media byte.
  ``store_write_amplification_fs`` is the same ratio for the bytes the file
  system was asked to write (``write_bytes`` of ``/proc/self/io`` around our
  run; ``ru_oublock`` from ``wait4`` for ffmpeg: the same kernel counter,
  whole dirtied pages, without the journal's own writes).
- ``store_recovery_s_10k_segments``: :meth:`SegmentStore.open` over 10,000
  segment files (8 cameras), page cache warm, median of 5. The files are
  copies of ONE small real sealed segment (one packet: the stream's SPS and
  PPS; about 400 bytes), under consecutive names whose size field is the
  file's size: the scan reads names and sizes, never contents. Peer: a bare
  ``os.scandir`` + ``stat`` of the same folders.
- ``store_seal_mb_s``: MB/s of media through :func:`agent.segment.encode` +
  :func:`agent.segment.seal` (two recipients) for 4 s segments of the stream.
  Peer: ``pyrage.encrypt`` of the same plaintext to the same recipients.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pyrage

from agent import segment
from agent.audit import AuditLog
from agent.store import SegmentStore, StoredSegment
from hardware import EncodedPacket
from tests.bench.common import (
    Figure,
    figure,
    h264_stream,
    make_temp_dir,
    repeat_file,
    run_measured,
    storage_write_bytes,
)
from tests.bench.replay import AccessUnits, load_access_units

BENCH = "store"
FPS = 30
SEGMENT_S = 4
T0_NS = 1_767_000_000_000_000_000
CAMERAS = 8

log = logging.getLogger("bench.store")


def _packets(units: AccessUnits, repeats: int, camera: str = "cam") -> list[EncodedPacket]:
    """The stream ``repeats`` times over, numbered and timed as capture does."""
    out = []
    for i in range(repeats * len(units.units)):
        payload, key = units.units[i % len(units.units)]
        t = i * 1_000_000_000 // FPS  # exact: the 4 s keyframe is not 40 ns early
        out.append(EncodedPacket(camera, i, T0_NS + t, t, key, "h264", payload, t))
    return out


def _desc(units: AccessUnits) -> segment.StreamDesc:
    return segment.StreamDesc("h264", units.width, units.height, float(FPS), units.extradata)


def _recipients() -> list[pyrage.x25519.Recipient]:
    """The district's and the receiver's (generated here; nobody opens these)."""
    return [pyrage.x25519.Identity.generate().to_public() for _ in range(2)]


# -- write amplification -----------------------------------------------------------------


async def _store_bytes(folder: Path, units: AccessUnits, repeats: int) -> tuple[int, int, int]:
    """Replay into a store; (media bytes, sealed bytes, bytes written per /proc/self/io)."""
    packets = _packets(units, repeats)
    now_s = packets[-1].capture_ns / 1e9
    audit = AuditLog(folder / "audit.jsonl", time.time)
    store = SegmentStore(
        folder / "store",
        _recipients(),
        audit=audit,
        boot_id="bench",
        segment_s=SEGMENT_S,
        clock=lambda: now_s,
    )
    sealed = asyncio.Event()
    done: list[StoredSegment] = []

    def on_sealed(seg: StoredSegment) -> None:
        done.append(seg)
        sealed.set()

    written0 = storage_write_bytes()
    await asyncio.to_thread(store.open)
    try:
        store.on_sealed(on_sealed)
        closed = 0
        desc = _desc(units)
        for pkt in packets:
            before = store.open_first_seq("cam")
            store.push(pkt, desc)
            if before is not None and store.open_first_seq("cam") != before:
                closed += 1  # the writer has one segment; wait for it (never drop one)
                async with asyncio.timeout(60):
                    while len(done) < closed:
                        sealed.clear()
                        await sealed.wait()
    finally:
        await store.close()
        audit.close()
    written = storage_write_bytes() - written0
    on_disk = sum(p.stat().st_size for p in (folder / "store" / "cam").iterdir())
    if on_disk != store.stats.bytes_written or store.stats.dropped or store.stats.write_errors:
        raise RuntimeError(f"store lost footage or miscounted: {store.stats}, {on_disk} on disk")
    log.info(
        "store: %d segments, %d media bytes -> %d sealed bytes; %d bytes to storage",
        store.stats.segments_written,
        store.stats.media_bytes,
        store.stats.bytes_written,
        written,
    )
    return store.stats.media_bytes, store.stats.bytes_written, written


def _ffmpeg_bytes(folder: Path, stream: Path, repeats: int) -> tuple[int, int, int]:
    """ffmpeg segmenting the same bytes; (media bytes, segment bytes, bytes written)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("ffmpeg is not installed")
    looped = folder / "input.h264"
    repeat_file(stream, looped, repeats)
    out = folder / "segments"
    out.mkdir()
    argv = [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin"]
    argv += ["-f", "h264", "-framerate", str(FPS), "-i", str(looped), "-c", "copy"]
    argv += ["-f", "segment", "-segment_time", str(SEGMENT_S), "-segment_format", "mpegts"]
    argv += ["-reset_timestamps", "1", str(out / "seg%05d.ts")]
    _, usage = run_measured(argv, timeout_s=300)
    files = list(out.iterdir())
    total = sum(p.stat().st_size for p in files)
    media = looped.stat().st_size
    log.info(
        "ffmpeg: %d segments, %d media bytes -> %d bytes; %d bytes to storage",
        len(files),
        media,
        total,
        usage.ru_oublock * 512,
    )
    return media, total, usage.ru_oublock * 512


async def write_amplification(tmp: Path, stream: Path, repeats: int) -> list[Figure]:
    """Sealed and file-system bytes per media byte, ours and ffmpeg's."""
    units = await asyncio.to_thread(load_access_units, stream)
    ours_dir, peer_dir = tmp / "wa-store", tmp / "wa-ffmpeg"
    ours_dir.mkdir()
    peer_dir.mkdir()
    media, sealed, fs = await _store_bytes(ours_dir, units, repeats)
    p_media, p_bytes, p_fs = await asyncio.to_thread(_ffmpeg_bytes, peer_dir, stream, repeats)
    if media != p_media:
        log.warning("media bytes differ: ours %d, ffmpeg's input %d", media, p_media)
    return [
        figure(
            BENCH,
            "store_write_amplification",
            sealed / media,
            "bytes_per_media_byte",
            "ffmpeg_copy_segment_mpegts",
            p_bytes / p_media,
        ),
        figure(
            BENCH,
            "store_write_amplification_fs",
            fs / media,
            "bytes_per_media_byte",
            "ffmpeg_copy_segment_mpegts_fs",
            p_fs / p_media,
        ),
    ]


# -- recovery ------------------------------------------------------------------------------


def _make_segments(root: Path, units: AccessUnits, total: int) -> bytes:
    """``total`` segment files over CAMERAS folders: copies of one small real sealed segment."""
    first = EncodedPacket("cam-0", 0, T0_NS, 0, True, "h264", units.extradata, None)
    _, plain = segment.encode([first], _desc(units), "bench")
    sealed = segment.seal(plain, _recipients())
    per_camera = total // CAMERAS
    for c in range(CAMERAS):
        folder = root / f"cam-{c}"
        folder.mkdir(parents=True)
        for i in range(per_camera):
            start_ms = T0_NS // 1_000_000 + i * SEGMENT_S * 1000
            name = segment.SegmentName(
                i * SEGMENT_S * FPS,
                (i + 1) * SEGMENT_S * FPS - 1,
                start_ms,
                start_ms + SEGMENT_S * 1000 - 34,
                len(sealed),
            )
            (folder / name.filename).write_bytes(sealed)
    return sealed


def _bare_scan(root: Path) -> int:
    count = 0
    with os.scandir(root) as top:
        for cam in top:
            if not cam.is_dir(follow_symlinks=False):  # the store's .ledger.json
                continue
            with os.scandir(cam.path) as files:
                for entry in files:
                    entry.stat(follow_symlinks=False)
                    count += 1
    return count


async def recovery(tmp: Path, stream: Path, total: int, rounds: int) -> Figure:
    """Median time of SegmentStore.open() over ``total`` files, and of a bare scan."""
    units = await asyncio.to_thread(load_access_units, stream)
    root = tmp / "recovery"
    started = time.perf_counter()
    sealed = await asyncio.to_thread(_make_segments, root, units, total)
    log.info(
        "made %d copies of one %d-byte sealed segment in %.1f s",
        total,
        len(sealed),
        time.perf_counter() - started,
    )
    audit = AuditLog(tmp / "recovery-audit.jsonl", time.time)
    ours: list[float] = []
    peer: list[float] = []
    try:
        for _ in range(rounds):
            store = SegmentStore(root, _recipients(), audit=audit, boot_id="bench")
            t0 = time.perf_counter()
            await asyncio.to_thread(store.open)
            ours.append(time.perf_counter() - t0)
            indexed = sum(len(store.segments(c)) for c in store.cameras())
            await store.close()
            if indexed != total // CAMERAS * CAMERAS:
                raise RuntimeError(f"the store indexed {indexed} of {total} segments")
            t0 = time.perf_counter()
            seen = await asyncio.to_thread(_bare_scan, root)
            peer.append(time.perf_counter() - t0)
            assert seen == indexed
    finally:
        audit.close()
    log.info(
        "open(): %s s; bare scan: %s s",
        " ".join(f"{x:.4f}" for x in ours),
        " ".join(f"{x:.4f}" for x in peer),
    )
    return figure(
        BENCH,
        "store_recovery_s_10k_segments",  # a few hundred in smoke mode (a shape check)
        statistics.median(ours),
        "s",
        "scandir_stat_s",
        statistics.median(peer),
    )


# -- sealing throughput --------------------------------------------------------------------


def seal_throughput(stream: Path, min_s: float, rounds: int) -> Figure:
    """MB/s of media through encode + seal, and through pyrage.encrypt alone (interleaved)."""
    units = load_access_units(stream)
    packets = _packets(units, 1)[: SEGMENT_S * FPS]
    media = sum(len(p.payload) for p in packets)
    desc, recipients = _desc(units), _recipients()
    _, plain = segment.encode(packets, desc, "bench")

    def ours() -> None:
        segment.seal(segment.encode(packets, desc, "bench")[1], recipients)

    def peer() -> None:
        pyrage.encrypt(plain, recipients)

    def rate(fn: Callable[[], None]) -> float:
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < min_s or n < 2:
            fn()
            n += 1
        return n * media / elapsed / 1e6

    ours_mb_s: list[float] = []
    peer_mb_s: list[float] = []
    for _ in range(rounds):
        ours_mb_s.append(rate(ours))
        peer_mb_s.append(rate(peer))
    log.info(
        "seal (%d media bytes, %d plaintext): ours %s MB/s; pyrage.encrypt %s MB/s",
        media,
        len(plain),
        " ".join(f"{x:.0f}" for x in ours_mb_s),
        " ".join(f"{x:.0f}" for x in peer_mb_s),
    )
    return figure(
        BENCH,
        "store_seal_mb_s",
        statistics.median(ours_mb_s),
        "MB_per_s",
        "pyrage_encrypt_mb_s",
        statistics.median(peer_mb_s),
    )


async def run(smoke: bool) -> list[Figure]:
    """All store figures: a small stream and a few hundred files in smoke mode."""
    if smoke:
        stream = await asyncio.to_thread(h264_stream, 2, 320, 240, FPS, 500_000)
        repeats, total, rounds, min_s = 2, 200, 1, 0.05
    else:
        stream = await asyncio.to_thread(h264_stream, 10)
        repeats, total, rounds, min_s = 6, 10_000, 5, 1.0
    with make_temp_dir(BENCH) as tmp_name:
        tmp = Path(tmp_name)
        figures = await write_amplification(tmp, stream, repeats)
        figures.append(await recovery(tmp, stream, total, rounds))
    figures.append(await asyncio.to_thread(seal_throughput, stream, min_s, min(rounds, 3)))
    return figures
