"""Errors of the receiver, and whose fault each one is.

Every error derives from :class:`ReceiverError` and carries a stable ``code``
(used as the ``error`` field of JSON replies and as the reason of protocol
``error`` messages). Errors caused by bad input also inherit the fitting
built-in (``ValueError``, ``LookupError``), so callers that only know the
built-ins still catch them.
"""

from __future__ import annotations

__all__ = [
    "BadSegmentError",
    "BitstreamError",
    "CorruptRecordingError",
    "ExportError",
    "InvalidIdError",
    "InvalidMetadataError",
    "InvalidPacketError",
    "InvalidSettingError",
    "MissingSpsError",
    "NoFootageError",
    "NotKeyframeError",
    "ReceiverError",
    "RecordingClosedError",
    "RecordingError",
    "RecordingFailedError",
    "SessionConflictError",
    "TrackMismatchError",
    "UnknownCameraError",
    "UnknownSessionError",
    "UnsupportedCodecError",
    "WrongIdentityError",
]


class ReceiverError(Exception):
    """Base of every error raised by the receiver package."""

    #: Stable machine-readable code; subclasses override it.
    code: str = "receiver_error"


class InvalidIdError(ReceiverError, ValueError):
    """A session, camera or device id is malformed (including path tricks)."""

    code = "invalid_id"


class InvalidSettingError(ReceiverError, ValueError):
    """A receiver setting (a command-line option or constructor argument) is unusable."""

    code = "invalid_setting"


class UnknownSessionError(ReceiverError, LookupError):
    """No recording exists for this session id."""

    code = "unknown_session"


class UnknownCameraError(ReceiverError, LookupError):
    """The session has no camera with this id."""

    code = "unknown_camera"


class BitstreamError(ReceiverError, ValueError):
    """Encoded media bytes are not what they claim to be (sender's fault)."""

    code = "bad_bitstream"


class MissingSpsError(BitstreamError):
    """H.264 data carries no sequence parameter set where one is needed."""

    code = "missing_sps"


class RecordingError(ReceiverError):
    """Base of errors about one session's recording."""

    code = "recording_error"


class UnsupportedCodecError(RecordingError, ValueError):
    """The track's codec cannot be recorded (only H.264 is remuxed to MP4)."""

    code = "unsupported_codec"


class TrackMismatchError(RecordingError, ValueError):
    """A re-opened session describes a known camera differently than before."""

    code = "track_mismatch"


class InvalidPacketError(RecordingError, ValueError):
    """An appended packet is unusable (for example an empty payload)."""

    code = "invalid_packet"


class NotKeyframeError(InvalidPacketError):
    """A recording must start with a keyframe and the first packet was not one."""

    code = "not_keyframe"


class RecordingClosedError(RecordingError):
    """The camera recording is closed; nothing more can be appended."""

    code = "recording_closed"


class RecordingFailedError(RecordingError):
    """Writing the recording failed (for example the disk is full).

    The durable part stays valid; re-opening the session recovers the camera
    into a new part file.
    """

    code = "recording_failed"


class CorruptRecordingError(RecordingError):
    """A stored ``session.json`` cannot be read or contradicts itself."""

    code = "corrupt_recording"


class SessionConflictError(RecordingError, ValueError):
    """A session id is re-opened by a different device than the one that opened it."""

    code = "session_conflict"


class InvalidMetadataError(RecordingError, ValueError):
    """Session metadata or a track description is malformed (not storable)."""

    code = "invalid_metadata"


class BadSegmentError(ReceiverError, ValueError):
    """A sealed segment cannot be opened or decoded, or is not what it claims to be."""

    code = "bad_segment"


class WrongIdentityError(BadSegmentError):
    """A sealed segment is not sealed to any identity we hold."""

    code = "wrong_identity"


class ExportError(ReceiverError):
    """An evidence export cannot be made as asked (the message says why)."""

    code = "export_failed"


class NoFootageError(ExportError, LookupError):
    """The store holds no footage of the camera in the time range."""

    code = "no_footage"
