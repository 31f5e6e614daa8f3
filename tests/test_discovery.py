"""mDNS advertisement and discovery (agent/discovery.py, breakglass provision discover).

The sans-IO part (TXT records, validation) is tested here directly. Every test
that sends mDNS runs it in child processes (tests/mdns_child.py) inside
network namespaces of its own: ``unshare -n`` (only a loopback, shared with
``nsenter``), or two ``ip netns`` namespaces joined by a veth pair, or, for
avahi, ``unshare -n -m -p`` (tests/avahi_interop.sh). This process never joins
a multicast group; the namespaces are gone when the tests end.
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zeroconf.asyncio import AsyncServiceInfo

from agent.discovery import (
    MAX_TXT_ENTRIES,
    SERVICE_TYPE,
    Advertiser,
    Discovered,
    DiscoveryError,
    TxtError,
    discover,
    discovered_from,
    parse_txt,
    txt_record,
)
from breakglass.provision_cli import _table

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
FP = "sha256:" + "0123456789abcdef" * 4
TXT = {"id": "lincoln-pi-1", "bld": "lincoln-elementary", "st": "armed", "v": "1", "fp": FP}
NOT_HERE = "192.0.2.1"  # TEST-NET-1: held by no interface
#: How long the tests browse. zeroconf answers a query for records it multicast
#: less than a second ago only a second later (RFC 6762 section 6), and an
#: advertiser has just announced when it says "ready": 1 s would be too short.
BROWSE_S = 2.0


def raw(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in txt.items()}


# -- sans-IO: TXT records --------------------------------------------------------------


def test_txt_record_has_exactly_the_design_keys() -> None:
    txt = txt_record("lincoln-pi-1", "lincoln-elementary", "armed", FP)
    assert txt == TXT
    assert txt_record("lincoln-pi-1", "", "unprovisioned", FP)["bld"] == ""


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device_id", ""),
        ("device_id", "Lincoln"),
        ("device_id", "x" * 33),
        ("device_id", "a b"),
        ("building", "Lincoln Elementary"),
        ("state", "idle"),
        ("fingerprint", "sha256:" + "0" * 63),
        ("fingerprint", "SHA256:" + "0" * 64),
        ("version", ""),
        ("version", "1 2"),
    ],
)
def test_txt_record_refuses_bad_values(field: str, value: str) -> None:
    args = {
        "device_id": "lincoln-pi-1",
        "building": "lincoln-elementary",
        "state": "armed",
        "fingerprint": FP,
    }
    version = "1"
    if field == "version":
        version = value
    else:
        args[field] = value
    with pytest.raises(TxtError):
        txt_record(**args, version=version)


def test_parse_txt_round_trip_and_tolerance() -> None:
    assert parse_txt(raw(TXT)) == TXT
    # Keys are case-insensitive; unknown keys (a later version) are ignored.
    props = {k.upper(): v for k, v in raw(TXT).items()} | {b"future": b"x", b"flag": None}
    assert parse_txt(props) == TXT
    for state in ("unprovisioned", "armed", "emergency", "fault"):
        assert parse_txt(raw(TXT | {"st": state}))["st"] == state
    assert parse_txt(raw(TXT | {"bld": ""}))["bld"] == ""


@pytest.mark.parametrize(
    ("props", "reason"),
    [
        ({k: v for k, v in raw(TXT).items() if k != b"fp"}, "missing key(s) fp"),
        (raw(TXT) | {b"st": None}, "'st' has no value"),
        (raw(TXT) | {b"ST": b"armed"}, "'st' appears twice"),
        (raw(TXT) | {b"st": b"on fire"}, "st 'on fire'"),
        (raw(TXT) | {b"id": b"\x1b[2Jevil"}, "not a device id"),
        (raw(TXT) | {b"bld": b"\xff\xfe"}, "bld: not UTF-8"),
        (raw(TXT) | {b"\xc3\xa9": b"x"}, "not ASCII"),
        (raw(TXT) | {b"": b"x"}, "an empty key"),
        (raw(TXT) | {b"fp": b"sha256:" + b"g" * 64}, "fp "),
        (raw(TXT) | {b"v": b""}, "v '': not a version"),
        (raw(TXT) | {b"pad": b"x" * 252}, "an entry of 256 bytes"),
        (raw(TXT) | {f"k{i}".encode(): b"x" * 200 for i in range(6)}, "more than 1300 bytes"),
        (raw(TXT) | {f"k{i}".encode(): None for i in range(MAX_TXT_ENTRIES)}, "entries (at most"),
    ],
)
def test_parse_txt_refuses_malformed_records(props: dict[bytes, bytes | None], reason: str) -> None:
    with pytest.raises(TxtError) as caught:
        parse_txt(props)
    assert reason in caught.value.reason
    assert len(str(caught.value)) < 200  # bounded: safe to log


@given(
    st.dictionaries(
        st.binary(max_size=12) | st.sampled_from([b"id", b"bld", b"st", b"v", b"fp", b"ID"]),
        st.none() | st.binary(max_size=300) | st.sampled_from([v.encode() for v in TXT.values()]),
        max_size=40,
    )
)
def test_parse_txt_never_fails_otherwise(props: dict[bytes, bytes | None]) -> None:
    try:
        txt = parse_txt(props)
    except TxtError:
        return
    assert txt == txt_record(txt["id"], txt["bld"], txt["st"], txt["fp"], version=txt["v"])


def test_discovered_from_checks_port_and_addresses() -> None:
    name = f"lincoln-pi-1.{SERVICE_TYPE}"
    info = AsyncServiceInfo(
        SERVICE_TYPE, name, port=8443, properties=raw(TXT), addresses=["10.0.0.5"]
    )
    assert discovered_from(info) == Discovered(
        name, "lincoln-pi-1", "lincoln-elementary", "armed", "1", FP, ("10.0.0.5",), 8443
    )
    no_address = AsyncServiceInfo(SERVICE_TYPE, name, port=8443, properties=raw(TXT))
    with pytest.raises(TxtError, match="no IPv4 address"):
        discovered_from(no_address)
    no_port = AsyncServiceInfo(SERVICE_TYPE, name, properties=raw(TXT), addresses=["10.0.0.5"])
    with pytest.raises(TxtError, match="port"):
        discovered_from(no_port)


def test_advertiser_validates_before_touching_the_network() -> None:
    def make(**kw: object) -> Advertiser:
        args: dict[str, object] = {"interfaces": ["127.0.0.1"]} | kw
        return Advertiser("lincoln-pi-1", "lincoln-elementary", 8443, FP, **args)  # type: ignore[arg-type]

    assert make().server == "lincoln-pi-1.local."
    assert make(hostname="pi-hub.local.").server == "pi-hub.local."
    assert make(hostname="pi-hub").server == "pi-hub.local."
    assert make().name == f"lincoln-pi-1.{SERVICE_TYPE}"
    with pytest.raises(TxtError, match="st 'idle'"):
        make(state="idle")
    with pytest.raises(DiscoveryError, match="hostname"):
        make(hostname="bad host")
    with pytest.raises(DiscoveryError, match="no interface"):
        make(interfaces=[])
    with pytest.raises(DiscoveryError, match="port"):
        Advertiser("lincoln-pi-1", "", 0, FP, interfaces=["127.0.0.1"])


@pytest.mark.parametrize(
    ("interface", "message"),
    [
        ("eth0", "interface 'eth0': not an IPv4 address"),
        ("0.0.0.0", "interface 0.0.0.0: not the address of one interface"),
        ("224.0.0.251", "interface 224.0.0.251: not the address of one interface"),
        (NOT_HERE, f"interface {NOT_HERE}: no network interface of this machine has this address"),
    ],
)
async def test_unusable_interfaces_are_named(interface: str, message: str) -> None:
    # These fail before zeroconf opens a socket: nothing is sent.
    advertiser = Advertiser("lincoln-pi-1", "", 8443, FP, interfaces=[interface])
    with pytest.raises(DiscoveryError) as caught:
        await advertiser.start()
    assert message in str(caught.value)
    await advertiser.close()
    with pytest.raises(DiscoveryError) as caught:
        await discover(interfaces=[interface], timeout_s=1)
    assert message in str(caught.value)
    with pytest.raises(DiscoveryError, match="timeout"):
        await discover(interfaces=["127.0.0.1"], timeout_s=0)


def test_table_shortens_the_pin() -> None:
    found = [
        Discovered("a", "lincoln-pi-1", "", "unprovisioned", "1", FP, ("10.0.0.5",), 8443),
        Discovered("b", "lincoln-pi-2", "lincoln", "emergency", "1", FP, ("10.0.0.6",), 443),
    ]
    lines = _table(found).splitlines()
    assert lines[0].split() == ["DEVICE", "BUILDING", "STATE", "ADDRESS", "FP"]
    assert lines[1].split() == [
        "lincoln-pi-1", "-", "unprovisioned", "10.0.0.5:8443", "sha256:0123456789abcdef...",
    ]  # fmt: skip
    assert lines[2].split()[2:4] == ["emergency", "10.0.0.6:443"]


# -- child processes in private network namespaces -------------------------------------


@pytest.fixture(scope="module")
def netns() -> None:
    """Skip (with the reason) where this machine cannot make network namespaces."""
    try:
        result = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot create a network namespace (unshare -n): {exc}")
    if result.returncode != 0:
        pytest.skip(f"cannot create a network namespace (unshare -n): {result.stderr!r}")


class Child:
    """A child process whose output lines we wait for (bounded), never sleeping."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=os.environ | {"PYTHONPATH": str(REPO)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.buffer = b""
        self.lines: list[str] = []
        self.err: str | None = None

    def expect(self, prefix: str, timeout: float = 15.0) -> str:
        """The next output line starting with ``prefix`` (others are kept in ``lines``)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for _ in range(10_000):
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                text = line.decode(errors="replace")
                self.lines.append(text)
                if text.startswith(prefix):
                    return text
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.selector.select(remaining):
                break
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                break
            self.buffer += chunk
        raise AssertionError(
            f"no line {prefix!r} from {self.argv[-8:]} within {timeout} s; got {self.lines}"
            f"; exit {self.proc.poll()}; stderr {self.stderr()}"
        )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def end_input(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def stderr(self) -> str:
        """What the child logged (once it has ended)."""
        if self.err is None:
            if self.proc.poll() is None or self.proc.stderr is None:
                return "(running)"
            self.err = self.proc.stderr.read().decode(errors="replace")[-4000:]
        return self.err

    def close(self, timeout: float = 10.0) -> int:
        """EOF on stdin, then wait; a child that does not end is killed (by its PID)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        finally:
            self.selector.close()
            if self.proc.poll() is not None:
                self.stderr()
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()


def mdns_child(*args: str) -> list[str]:
    return [PY, "-m", "tests.mdns_child", *args]


def cli(*args: str) -> list[str]:
    return [PY, "-m", "breakglass", "provision", "discover", *args]


def in_private_lo(argv: list[str]) -> list[str]:
    """``argv`` in a new network namespace with only loopback (up); exec keeps the PID."""
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *argv]


def run(argv: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def browse(prefix: list[str], interface: str, timeout: float = BROWSE_S) -> list[dict[str, object]]:
    result = run(prefix + mdns_child("browse", "--interface", interface, "--timeout", str(timeout)))
    assert result.returncode == 0, result.stderr
    found: list[dict[str, object]] = json.loads(result.stdout)
    return found


ADVERTISE = ("advertise", "--id", "lincoln-pi-1", "--building", "lincoln-elementary")


@pytest.mark.usefixtures("netns")
def test_advertise_update_discover_and_goodbye_on_loopback() -> None:
    adv = Child(in_private_lo(mdns_child(*ADVERTISE, "--port", "8443", "--fp", FP,
                                         "--interface", "127.0.0.1")))  # fmt: skip
    watcher: Child | None = None
    try:
        assert adv.expect("ready") == f"ready lincoln-pi-1.{SERVICE_TYPE}"
        ns = ["nsenter", "-t", str(adv.proc.pid), "-n"]  # the advertiser's namespace

        found = browse(ns, "127.0.0.1")
        assert found == [
            {
                "name": f"lincoln-pi-1.{SERVICE_TYPE}",
                "device_id": "lincoln-pi-1",
                "building": "lincoln-elementary",
                "state": "armed",
                "version": "1",
                "fingerprint": FP,
                "addresses": ["127.0.0.1"],
                "port": 8443,
            }
        ]

        result = run(ns + cli("--json", "--interface", "127.0.0.1", "--timeout", str(BROWSE_S)))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == found
        assert "note:" not in result.stderr

        adv.send("emergency")
        assert adv.expect("state") == "state emergency changed"
        assert [d["state"] for d in browse(ns, "127.0.0.1")] == ["emergency"]
        adv.send("emergency")
        assert adv.expect("state") == "state emergency unchanged"
        adv.send("on-fire")
        assert adv.expect("error").startswith("error malformed TXT record: st 'on-fire'")

        # A browser that is running sees the update and the goodbye.
        watcher = Child(ns + mdns_child("watch", "--interface", "127.0.0.1"))
        watcher.expect(f"added lincoln-pi-1.{SERVICE_TYPE}")
        adv.send("fault")
        assert adv.expect("state") == "state fault changed"
        watcher.expect(f"updated lincoln-pi-1.{SERVICE_TYPE}")
        adv.end_input()
        adv.expect("closed")  # goodbyes sent
        assert adv.close() == 0
        watcher.expect(f"removed lincoln-pi-1.{SERVICE_TYPE}")
    finally:
        if watcher is not None:
            watcher.close()
        if adv.proc.poll() is None:
            adv.close()


@pytest.mark.usefixtures("netns")
def test_malformed_services_are_skipped_with_a_reason() -> None:
    good = Child(in_private_lo(mdns_child(*ADVERTISE, "--port", "8443", "--interface",
                                          "127.0.0.1")))  # fmt: skip
    bad: list[Child] = []
    try:
        good.expect("ready")
        ns = ["nsenter", "-t", str(good.proc.pid), "-n"]
        for name, txt in [
            ("bad-state", ["id=bad-state", "bld=", "st=on-fire", "v=1", f"fp={FP}"]),
            ("no-pin", ["id=no-pin", "bld=", "st=armed", "v=1"]),
            ("huge", ["id=huge", "bld=", "st=armed", "v=1", f"fp={FP}"]
             + [f"k{i}=" + "x" * 200 for i in range(6)]),
        ]:  # fmt: skip
            args = ["advertise", "--id", name, "--port", "1", "--interface", "127.0.0.1"]
            bad.append(Child(ns + mdns_child(*args, *(f"--raw-txt={t}" for t in txt))))
        for child in bad:
            child.expect("ready")
        result = run(
            ns + mdns_child("browse", "--interface", "127.0.0.1", "--timeout", str(BROWSE_S))
        )
        assert result.returncode == 0, result.stderr
        assert [d["device_id"] for d in json.loads(result.stdout)] == ["lincoln-pi-1"]
        assert "'bad-state._breakglass._tcp.local.' skipped: st 'on-fire'" in result.stderr
        assert "'no-pin._breakglass._tcp.local.' skipped: missing key(s) fp" in result.stderr
        assert "'huge._breakglass._tcp.local.' skipped: more than 1300 bytes" in result.stderr
    finally:
        for child in [*bad, good]:
            child.close()


@pytest.mark.usefixtures("netns")
def test_interface_down_is_a_clear_error_and_nothing_found_exits_1() -> None:
    # lo left down: joining the mDNS group fails, and the error names the interface.
    argv = mdns_child("advertise", "--id", "x", "--port", "1", "--interface", "127.0.0.1")
    result = run(["unshare", "-n", *argv])
    assert result.returncode == 2
    assert "error: interface 127.0.0.1: cannot join the mDNS group" in result.stderr
    # Nobody advertises; no --interface: 127.0.0.1 with a note, exit 1.
    result = run(in_private_lo(cli("--timeout", "0.5")))
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "note: browsing 127.0.0.1 only" in result.stderr
    assert "--interface <the technician laptop's LAN address>" in result.stderr
    assert "no breakglass agent answered on 127.0.0.1" in result.stderr


_netns_seq = itertools.count()


@pytest.fixture
def veth_pair(netns: None) -> Iterator[tuple[str, str]]:
    """Two network namespaces (10.200.0.1 and 10.200.0.2 on a veth pair); deleted after."""
    n = next(_netns_seq)
    a, b = f"bg-{os.getpid()}-{n}-a", f"bg-{os.getpid()}-{n}-b"
    made: list[str] = []
    try:
        for name in (a, b):
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
            made.append(name)
        # Made inside the namespaces: the host's own namespace never holds the veth.
        for cmd in (
            ["ip", "-n", a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0",
             "netns", b],
            ["ip", "-n", a, "addr", "add", "10.200.0.1/24", "dev", "veth0"],
            ["ip", "-n", b, "addr", "add", "10.200.0.2/24", "dev", "veth0"],
            ["ip", "-n", a, "link", "set", "veth0", "up"],
            ["ip", "-n", b, "link", "set", "veth0", "up"],
            ["ip", "-n", a, "link", "set", "lo", "up"],
            ["ip", "-n", b, "link", "set", "lo", "up"],
        ):  # fmt: skip
            subprocess.run(cmd, check=True, timeout=10, capture_output=True)
        yield a, b
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], timeout=10, check=False)


def test_discovery_across_two_namespaces(veth_pair: tuple[str, str]) -> None:
    a, b = veth_pair
    args = [*ADVERTISE, "--port", "8443", "--fp", FP, "--interface", "10.200.0.1"]
    adv = Child(["ip", "netns", "exec", a, *mdns_child(*args)])
    try:
        adv.expect("ready")
        in_b = ["ip", "netns", "exec", b]
        result = run([*in_b, *cli("--interface", "10.200.0.2", "--timeout", str(BROWSE_S))])
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["DEVICE", "BUILDING", "STATE", "ADDRESS", "FP"]
        assert lines[1].split() == [
            "lincoln-pi-1", "lincoln-elementary", "armed", "10.200.0.1:8443",
            "sha256:0123456789abcdef...",
        ]  # fmt: skip
        assert len(lines) == 2

        # A second agent with the same device id (a cloned SD card): zeroconf's
        # probing renames it, with its own host name, so the addresses stay apart.
        dup = Child([*in_b, *mdns_child(*ADVERTISE, "--port", "9443", "--interface", "10.200.0.2")])
        try:
            assert dup.expect("ready") == f"ready lincoln-pi-1-2.{SERVICE_TYPE}"
            result = run([*in_b, *cli("--json", "--interface", "10.200.0.2",
                                      "--timeout", str(BROWSE_S))])  # fmt: skip
            assert result.returncode == 0, result.stderr
            found = {d["name"]: (d["device_id"], d["addresses"], d["port"])
                     for d in json.loads(result.stdout)}  # fmt: skip
            assert found == {
                f"lincoln-pi-1.{SERVICE_TYPE}": ("lincoln-pi-1", ["10.200.0.1"], 8443),
                f"lincoln-pi-1-2.{SERVICE_TYPE}": ("lincoln-pi-1", ["10.200.0.2"], 9443),
            }
            assert "2 services claim device id lincoln-pi-1" in result.stderr
            dup.end_input()
            dup.expect("closed")
        finally:
            dup.close()
        assert "is taken on the network; advertising as lincoln-pi-1-2" in dup.stderr()
    finally:
        adv.close()


AVAHI_TOOLS = ("avahi-daemon", "avahi-browse", "avahi-publish-service", "dbus-daemon")


@pytest.mark.usefixtures("netns")
def test_avahi_sees_the_advertiser_and_we_see_avahi(tmp_path: Path) -> None:
    missing = [tool for tool in AVAHI_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (./dev test installs avahi via apt)")
    result = run(
        ["unshare", "-n", "-m", "-p", "-f", "--kill-child", "--propagation", "private",
         "sh", str(REPO / "tests" / "avahi_interop.sh"), PY, str(tmp_path)],
        timeout=45,
    )  # fmt: skip
    logs = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    assert result.returncode == 0, (result.stdout, result.stderr, logs)
    out = result.stdout
    browsed = out.split("== avahi-browse\n", 1)[1].split("== end", 1)[0]
    resolved = [line for line in browsed.splitlines() if line.startswith("=;")]
    assert len(resolved) == 1, browsed
    fields = resolved[0].split(";")
    assert fields[3:9] == ["zc-pi-1", "_breakglass._tcp", "local", "zc-pi-1.local", "127.0.0.1",
                           "8443"]  # fmt: skip
    txt = set(fields[9].split(" "))
    assert txt == {f'"fp={FP}"', '"v=1"', '"st=armed"', '"bld=lincoln-elementary"', '"id=zc-pi-1"'}
    discovered = json.loads(out.split("== discover\n", 1)[1].split("== end", 1)[0])
    by_id = {d["device_id"]: d for d in discovered}
    assert by_id["avahi-pi-1"]["state"] == "emergency"
    assert by_id["avahi-pi-1"]["port"] == 9443
    assert by_id["avahi-pi-1"]["addresses"] == ["127.0.0.1"]
    assert by_id["zc-pi-1"]["fingerprint"] == FP
