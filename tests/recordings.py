"""What a receiver recorded of a session's camera, checked the way an examiner would."""

from __future__ import annotations

import json
import subprocess

from agent.uplink import SessionStream
from receiver.server import Receiver
from receiver.summaries import CameraSummary


def camera_summary(receiver: Receiver, session_id: str, camera: str) -> CameraSummary | None:
    """The receiver's summary of one camera of a session (None before it exists)."""
    for session in receiver.store.sessions():
        if session.session_id == session_id:
            return next((c for c in session.cameras if c.camera_id == camera), None)
    return None


def recorded_seqs(receiver: Receiver, session_id: str, camera: str) -> set[int]:
    """Every seq of the camera durable at the receiver."""
    cam = camera_summary(receiver, session_id, camera)
    if cam is None:
        return set()
    return {seq for part in cam.parts for seq in range(part.first_seq, part.last_seq + 1)}


def frames_in(path: object) -> int:
    """Frames ffprobe decodes in a part file (H.264 checked)."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    (stream,) = json.loads(out)["streams"]
    assert stream["codec_name"] == "h264"
    return int(stream["nb_read_frames"])


def assert_gapless(receiver: Receiver, session_id: str, camera: str, first: int, last: int) -> None:
    """Exactly the seqs ``first..last`` recorded, nothing declared lost, files agree."""
    cam = camera_summary(receiver, session_id, camera)
    assert cam is not None
    assert cam.gaps == () and cam.missing == () and cam.bad_segments == (), cam
    seqs = recorded_seqs(receiver, session_id, camera)
    assert set(range(first, last + 1)) <= seqs, sorted(set(range(first, last + 1)) - seqs)[:20]
    # ... and nothing from outside the emergency (sealed segments hold whole seconds).
    assert min(seqs) == first and max(seqs) == last, (min(seqs), max(seqs), first, last)
    assert sum(frames_in(part.path) for part in cam.parts) == len(seqs)


def assert_session_gapless(receiver: Receiver, stream: SessionStream) -> None:
    """Every camera of an ended session recorded exactly from its first seq to its end."""
    for cam in stream.open.cameras:
        end = stream.end_seq[cam.index]
        assert end is not None, "the session has not ended"
        assert_gapless(receiver, stream.id, cam.id, cam.first_seq, end)


def assert_declared(receiver: Receiver, session_id: str, camera: str) -> None:
    """Whatever the recording lacks was declared lost by the agent: nothing silently missing."""
    cam = camera_summary(receiver, session_id, camera)
    assert cam is not None
    assert cam.missing == () and cam.bad_segments == (), cam
    assert sum(frames_in(part.path) for part in cam.parts) == len(
        recorded_seqs(receiver, session_id, camera)
    )
