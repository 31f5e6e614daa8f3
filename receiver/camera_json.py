"""A camera's recording as ``session.json`` stores it and as the API summarizes it.

Schema 2 entry of a camera in ``session.json``::

    {"camera_id", "zone", "codec", "width", "height", "fps", "extradata" (base64),
     "first_seq", "first_live_seq",
     "runs": [{"parts": [{"file", "first_seq", "first_capture_us"}]}],
     "gaps": [{"first", "last", "reason"}],
     "bad_segments": [{"first_seq", "last_seq": null, "capture_us", "error", "count"}]}

Sample counts are not stored: they are read from the part files (box headers).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from receiver import seqranges
from receiver.camera_recording import CameraRecording, TrackInfo
from receiver.errors import CorruptRecordingError
from receiver.run import PartInfo
from receiver.summaries import (
    BadSegment,
    CameraSummary,
    DeclaredGap,
    PartSummary,
    RunSummary,
    parse_part_file,
    validate_camera_id,
)

__all__ = ["camera_from_json", "camera_json", "camera_summary"]

#: Missing ranges listed in a summary (the count of missing seqs is always exact).
MAX_MISSING_LISTED = 256


def camera_summary(cam: CameraRecording, directory: Path) -> CameraSummary:
    """A snapshot of one camera's recording for the API (runs holding frames only)."""
    held = cam.held()
    t = cam.track
    last = held[-1][1] if held else t.first_seq - 1
    missing = seqranges.missing(t.first_seq, last, cam.covered())
    runs = tuple(
        RunSummary(
            tuple(
                PartSummary(p.file, directory / p.file, p.first_seq, p.frames, p.first_capture_us)
                for p in run.parts
                if p.frames
            )
        )
        for run in cam.runs
        if run.frames_durable
    )
    frames = cam.frames_durable
    preroll = cam.preroll_frames
    return CameraSummary(
        camera_id=t.camera_id,
        zone=t.zone,
        codec=t.codec,
        mse_codec=cam.mse_codec,
        width=t.width,
        height=t.height,
        fps=t.fps,
        first_seq=t.first_seq,
        durable_seq=cam.durable_seq,
        frames_durable=frames,
        preroll_frames=preroll,
        live_frames=frames - preroll,
        first_live_seq=cam.first_live_seq,
        recording=cam.writable,
        runs=runs,
        gaps=tuple(cam.gaps),
        bad_segments=tuple(
            BadSegment(b.first_seq, b.capture_us, b.error, b.count) for b in cam.bad_segments
        ),
        missing=tuple(missing[:MAX_MISSING_LISTED]),
        missing_frames=sum(b - a + 1 for a, b in missing),
        duplicates=cam.duplicates,
        dropped=cam.dropped,
        first_durable_mono_ns=cam.first_durable_mono_ns,
        first_live_durable_mono_ns=cam.first_live_durable_mono_ns,
    )


def camera_json(cam: CameraRecording) -> dict[str, Any]:
    """One camera as stored in ``session.json`` (every part listed, empty ones too)."""
    t = cam.track
    return {
        "camera_id": t.camera_id,
        "zone": t.zone,
        "codec": t.codec,
        "width": t.width,
        "height": t.height,
        "fps": t.fps,
        "extradata": base64.b64encode(t.extradata).decode(),
        "first_seq": t.first_seq,
        "first_live_seq": cam.first_live_seq,
        "runs": [
            {
                "parts": [
                    {
                        "file": p.file,
                        "first_seq": p.first_seq,
                        "first_capture_us": p.first_capture_us,
                    }
                    for p in run.parts
                ]
            }
            for run in cam.runs
        ],
        "gaps": [g.to_json() for g in cam.gaps],
        "bad_segments": [b.to_json() for b in cam.bad_segments],
    }


def camera_from_json(
    doc: dict[str, Any],
    directory: Path,
    *,
    mark_dirty: Callable[[], None],
    save_soon: Callable[[], None],
    save: Callable[[], Coroutine[Any, Any, None]],
    mono_ns: Callable[[], int],
) -> CameraRecording:
    """A camera read back from ``session.json`` (its runs not yet scanned).

    Raises KeyError, TypeError or ValueError for a malformed entry, and
    :class:`CorruptRecordingError` for a part file name that is not this camera's.
    """
    track = TrackInfo(
        validate_camera_id(doc["camera_id"]),
        str(doc["zone"]),
        str(doc["codec"]),
        int(doc["width"]),
        int(doc["height"]),
        float(doc["fps"]),
        base64.b64decode(doc["extradata"], validate=True),
        int(doc["first_seq"]),
    )
    live = doc["first_live_seq"]
    cam = CameraRecording(
        track,
        directory,
        first_live_seq=None if live is None else int(live),
        mark_dirty=mark_dirty,
        save_soon=save_soon,
        save=save,
        mono_ns=mono_ns,
    )
    runs: list[list[PartInfo]] = []
    for entry in doc["runs"]:
        parts = [
            PartInfo(str(p["file"]), int(p["first_seq"]), p["first_capture_us"])
            for p in entry["parts"]
        ]
        for part in parts:
            if parse_part_file(part.file) != (track.camera_id, part.first_seq):
                raise CorruptRecordingError(f"{directory}: bad part file {part.file!r}")
        if not parts:
            raise ValueError(f"camera {track.camera_id!r}: a run without parts")
        runs.append(parts)
    cam.restore(
        runs,
        [DeclaredGap.from_json(g) for g in doc["gaps"]],
        [BadSegment.from_json(b) for b in doc["bad_segments"]],
    )
    return cam
