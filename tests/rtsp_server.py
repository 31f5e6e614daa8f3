"""A real RTSP camera for tests: gst-rtsp-server serving a live test pattern.

Run by the SYSTEM Python (``/usr/bin/python3``), which has GStreamer's
introspection bindings from Debian (``python3-gi``,
``gir1.2-gst-rtsp-server-1.0``); the project's venv does not. Binds to
127.0.0.1 only, serves ``rtsp://127.0.0.1:PORT/cam`` and prints
``ready PORT`` on stdout once it listens (``PORT`` may be given as 0: the
line then says which port the kernel chose). It exits when its stdin closes,
so a test runner that dies does not leave it behind; tests end it with a
kill by PID.

``--check`` only verifies that every GStreamer element the pipelines need is
installed, and says which is missing.

Each RTSP client gets its own pipeline (an unshared media factory), so a new
connection starts with a fresh encoder and its stream with a keyframe;
``--shared`` serves one stream to all clients instead, as a camera does.
"""

from __future__ import annotations

import argparse
import sys

ELEMENTS = ("videotestsrc", "x264enc", "rtph264pay", "jpegenc", "rtpjpegpay")


def pipeline(args: argparse.Namespace) -> str:
    """The gst-launch description of the served stream."""
    raw = (
        f"videotestsrc is-live=true pattern=ball ! "
        f"video/x-raw,format=I420,width={args.width},height={args.height},framerate={args.fps}/1"
    )
    if args.codec == "jpeg":
        # A camera that is not H.264 (an MJPEG IP camera): the source must refuse it clearly.
        return f"( {raw} ! jpegenc ! rtpjpegpay name=pay0 pt=26 )"
    # Out of band: SPS/PPS only in the SDP (sprop-parameter-sets), as many IP cameras do.
    x264 = "option-string=repeat-headers=0" if args.out_of_band else ""
    interval = 0 if args.out_of_band else 1
    return (
        f"( {raw} ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.gop} "
        f"{x264} ! video/x-h264,profile=constrained-baseline ! "
        f"rtph264pay name=pay0 pt=96 config-interval={interval} )"
    )


def main() -> int:
    """Serve until stdin closes or the process is killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--check", action="store_true", help="check the GStreamer elements")
    parser.add_argument("--codec", choices=("h264", "jpeg"), default="h264")
    parser.add_argument("--out-of-band", action="store_true", help="SPS/PPS only in the SDP")
    parser.add_argument("--shared", action="store_true", help="one pipeline for all clients")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--gop", type=int, default=15, help="frames between keyframes")
    args = parser.parse_args()

    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    missing = [name for name in ELEMENTS if Gst.ElementFactory.find(name) is None]
    if missing:
        print(f"missing GStreamer elements: {' '.join(missing)}", file=sys.stderr)
        return 1
    if args.check:
        return 0

    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(pipeline(args))
    factory.set_shared(args.shared)
    server.get_mount_points().add_factory("/cam", factory)
    loop = GLib.MainLoop()
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1

    def stdin_closed(*_: object) -> bool:
        loop.quit()
        return False

    GLib.io_add_watch(sys.stdin.fileno(), GLib.IO_IN | GLib.IO_HUP | GLib.IO_ERR, stdin_closed)
    print(f"ready {server.get_bound_port()}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
