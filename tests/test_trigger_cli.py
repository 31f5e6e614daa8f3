"""``breakglass trigger sign|send|challenge`` and ``breakglass trust keylist``.

The send paths are checked against a few-line TLS stub (not the agent's local
API, which has its own tests): accepted, refused, wrong pin, oversized answer.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from breakglass.cli import main
from provisioning import documents as d
from provisioning.keys import load_public_key
from provisioning.tls import ensure_certificate, server_context
from provisioning.triggers import (
    Accepted,
    Challenges,
    Keyring,
    MemoryReplayCache,
    Rejected,
    parse_key_list,
    verify_trigger,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
BUILDING = "lincoln-elementary"
WRONG_PIN = "sha256:" + "00" * 32


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``breakglass ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    out = capsys.readouterr()
    return code, out.out, out.err


def openssl_key(path: Path) -> Path:
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(path)],
        check=True,
        capture_output=True,
    )
    path.chmod(0o600)
    pub = path.with_suffix(".pub")
    subprocess.run(
        ["openssl", "pkey", "-in", str(path), "-pubout", "-out", str(pub)],
        check=True,
        capture_output=True,
    )
    return pub


class District:
    """An authority key, and trigger-key lists made by ``breakglass trust keylist``."""

    def __init__(self, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.folder = folder
        self.capsys = capsys
        self.authority = folder / "authority.pem"
        code, _, err = run(capsys, "keys", "new", "--out", str(self.authority))
        assert code == 0, err

    def keyring(self, *keys: str, version: int = 1) -> Keyring:
        out = self.folder / f"trigger-keys-v{version}.json"
        argv = ["trust", "keylist", "--authority", str(self.authority)]
        argv += ["--version", str(version), "--valid-days", "30", "--out", str(out)]
        for key in keys:
            argv += ["--key", key]
        code, stdout, err = run(self.capsys, *argv)
        assert code == 0, err
        assert f"trigger-key list v{version} ({len(keys)} key(s)" in stdout
        authority = load_public_key(self.authority.with_suffix(".pub"))
        keyring = Keyring()
        keyring.install(parse_key_list(out.read_bytes(), authority), time.time())
        return keyring


@pytest.fixture
def district(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> District:
    return District(tmp_path, capsys)


def verify(
    body: str | bytes,
    keyring: Keyring,
    *,
    now: float | None = None,
    challenges: Challenges | None = None,
) -> Accepted | Rejected:
    return verify_trigger(
        body,
        building=BUILDING,
        keyring=keyring,
        now=time.time() if now is None else now,
        mono=time.monotonic(),
        replay=MemoryReplayCache(),
        challenges=challenges or Challenges(),
    )


# -- sign and keylist --------------------------------------------------------------------


def test_a_signed_trigger_verifies_against_the_signed_key_list(
    district: District, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "dispatch.key"
    assert run(capsys, "keys", "new", "--out", str(key))[0] == 0
    keyring = district.keyring(f"{key.with_suffix('.pub')}:dispatch:all:County 911: dispatch")
    code, out, err = run(
        capsys,
        *("trigger", "sign", "--key", str(key), "--action", "end", "--building", BUILDING),
        *("--cameras", "hallway-2,gym", "--reason", "all clear", "--lifetime", "300"),
        *("--session", "20261128T133000Z-3f9a1c2e"),
    )
    assert code == 0, err
    assert out.count("\n") == 1  # one line
    result = verify(out, keyring)
    assert isinstance(result, Accepted), result
    trigger = result.trigger
    assert (trigger.action, trigger.building, trigger.cameras) == (
        "end",
        BUILDING,
        ("hallway-2", "gym"),
    )
    assert (trigger.reason, trigger.role, trigger.label) == (
        "all clear",
        "dispatch",
        "County 911: dispatch",
    )
    assert trigger.exp - trigger.iat == 300
    assert trigger.session == "20261128T133000Z-3f9a1c2e"  # ends that session only
    payload = d.parse_envelope(out).payload
    assert d.canonical(json.loads(payload)) == payload


def test_an_openssl_key_signs_with_a_device_challenge(
    district: District, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "principal.pem"
    pub = openssl_key(key)
    keyring = district.keyring(f"{pub}:principal:{BUILDING},jefferson-high:Principal Lee")
    challenges = Challenges()
    challenge = challenges.issue(time.monotonic())
    code, out, err = run(
        capsys,
        *("trigger", "sign", "--key", str(key), "--action", "start", "--building", BUILDING),
        *("--reason", "intruder in the east wing", "--challenge", challenge),
    )
    assert code == 0, err
    # The device's clock is a day off: the challenge carries the freshness.
    result = verify(out, keyring, now=time.time() - 86400, challenges=challenges)
    assert isinstance(result, Accepted), result
    assert (result.trigger.challenge, result.trigger.cameras) == (challenge, None)


def test_a_principal_may_not_end_and_an_unlisted_key_is_unknown(
    district: District, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    principal, stranger = tmp_path / "principal.pem", tmp_path / "stranger.pem"
    keyring = district.keyring(f"{openssl_key(principal)}:principal:all:P")
    openssl_key(stranger)
    for key, code in ((principal, "role_forbidden"), (stranger, "unknown_key")):
        done, out, err = run(
            capsys,
            *("trigger", "sign", "--key", str(key), "--action", "end"),
            *("--building", BUILDING, "--reason", "over"),
        )
        assert done == 0, err
        result = verify(out, keyring)
        assert isinstance(result, Rejected)
        assert result.code == code


def test_a_key_readable_by_others_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "dispatch.pem"
    openssl_key(key)
    key.chmod(0o644)
    code, out, err = run(
        capsys,
        *("trigger", "sign", "--key", str(key), "--action", "start"),
        *("--building", BUILDING, "--reason", "r"),
    )
    assert (code, out) == (2, "")
    assert "mode 0644 is too open" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--building", "Lincoln"], "argument --building: 'Lincoln': a building id is"),
        (["--cameras", "a,a"], "argument --cameras: 'a,a': a camera is listed twice"),
        (["--cameras", "a,,b"], "argument --cameras: '': a camera id is"),
        (["--lifetime", "301"], "argument --lifetime: 301 is not in 1..300"),
        (["--lifetime", "0"], "argument --lifetime: 0 is not in 1..300"),
        (["--reason", "two\nlines"], "argument --reason: 1-500 printable characters"),
        (["--challenge", "short"], "argument --challenge: 'short': not 16-64 bytes"),
        (["--action", "stop"], "argument --action: invalid choice: 'stop'"),
        (["--session", "a b"], "argument --session: 'a b': not a session id"),
        (["--session", "20261128T133000Z-3f9a1c2e"], "--session: only an extend or an end"),
    ],
)
def test_bad_sign_arguments_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    base = {"--key": str(tmp_path / "k.pem"), "--action": "start", "--building": BUILDING}
    base |= {"--reason": "r"}
    base |= dict(zip(args[::2], args[1::2], strict=True))
    code, out, err = run(capsys, "trigger", "sign", *[x for kv in base.items() for x in kv])
    assert (code, out) == (2, "")
    assert message in err, err


def test_bad_keylist_keys_are_clear_errors_naming_the_argument(
    district: District, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pub = openssl_key(tmp_path / "dispatch.pem")
    (tmp_path / "garbage.pub").write_text("not a key\n")
    cases = {
        f"{pub}:dispatch:all": "expected PUB.pem:ROLE:BUILDINGS:LABEL",
        f"{pub}:janitor:all:J": "role 'janitor' is not one of dispatch|principal|superintendent",
        f"{pub}:principal:Lincoln High:P": "'Lincoln High': a building id is",
        f"{pub}:principal:a,a:P": "a building is listed twice",
        f"{pub}:dispatch:all:tab\there": "the label is 1-120 printable characters",
        f"{tmp_path}/missing.pub:dispatch:all:D": "cannot read (No such file or directory)",
        f"{tmp_path}/garbage.pub:dispatch:all:D": "not a PEM public key",
    }
    out = tmp_path / "list.json"
    for key, message in cases.items():
        code, stdout, err = run(
            capsys,
            *("trust", "keylist", "--authority", str(district.authority), "--version", "1"),
            *("--valid-days", "30", "--key", key, "--out", str(out)),
        )
        assert (code, stdout) == (2, ""), key
        assert f"argument --key: {key!r}: " in err, err
        assert message in err, err
    assert not out.exists()


def test_the_same_key_twice_and_a_bad_version_are_refused(
    district: District, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pub = openssl_key(tmp_path / "dispatch.pem")
    argv = ["trust", "keylist", "--authority", str(district.authority), "--valid-days", "30"]
    argv += ["--out", str(tmp_path / "list.json"), "--key", f"{pub}:dispatch:all:A"]
    code, _, err = run(capsys, *argv, "--version", "2", "--key", f"{pub}:principal:all:B")
    assert code == 2
    assert "are the same public key" in err
    code, _, err = run(capsys, *argv, "--version", "0")
    assert code == 2
    assert "argument --version: 0 is not in 1..1099511627776" in err
    assert not (tmp_path / "list.json").exists()


# -- send and challenge ------------------------------------------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound by nobody who listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def envelope_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    key = tmp_path / "dispatch.pem"
    openssl_key(key)
    code, out, err = run(
        capsys,
        *("trigger", "sign", "--key", str(key), "--action", "start"),
        *("--building", BUILDING, "--reason", "911 call"),
    )
    assert code == 0, err
    path = tmp_path / "trigger.json"
    path.write_text(out)
    return path


def test_send_refuses_without_a_pin(
    envelope_file: Path, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    to = f"https://127.0.0.1:{closed_port}"
    code, out, err = run(capsys, "trigger", "send", "--to", to, "--file", str(envelope_file))
    assert (code, out) == (2, "")
    assert "the following arguments are required: --pin" in err
    code, out, _ = run(capsys, "trigger", "send", "--help")
    assert code == 0
    assert "[--pin" not in out  # the usage line shows it as required
    assert "no trust on first use" in " ".join(out.split())


@pytest.mark.parametrize(
    ("to", "pin", "message"),
    [
        ("http://127.0.0.1:1", WRONG_PIN, "expected https://AGENT:PORT"),
        ("https://127.0.0.1:1/v1/triggers", WRONG_PIN, "without a path"),
        ("https://127.0.0.1:1", "sha256:abcd", "TLS pin must be 32 bytes"),
        ("https://127.0.0.1:1", "md5:" + "00" * 16, "TLS pin must start with 'sha256:'"),
    ],
)
def test_send_bad_addresses_and_pins(
    envelope_file: Path, capsys: pytest.CaptureFixture[str], to: str, pin: str, message: str
) -> None:
    argv = ["--to", to, "--pin", pin]
    code, _, err = run(capsys, "trigger", "send", *argv, "--file", str(envelope_file))
    assert code == 2
    assert message in err, err


def test_send_does_not_send_a_malformed_envelope(
    tmp_path: Path, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"payload": "x", "kid": "nope", "sig": ""}')
    to = f"https://127.0.0.1:{closed_port}"
    code, _, err = run(
        capsys, "trigger", "send", "--to", to, "--pin", WRONG_PIN, "--file", str(bad)
    )
    assert code == 1
    assert "breakglass: error: malformed: envelope.kid" in err
    assert "(not sent)" in err


def test_send_to_an_unreachable_agent_exits_2(envelope_file: Path, closed_port: int) -> None:
    # The real command, the envelope on stdin.
    to = f"https://127.0.0.1:{closed_port}"
    done = subprocess.run(
        [sys.executable, "-m", "breakglass", "trigger", "send", "--to", to, "--pin", WRONG_PIN],
        input=envelope_file.read_bytes(),
        capture_output=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == b""
    assert re.search(
        rb"cannot reach the agent at https://127\.0\.0\.1:\d+/v1/triggers: Connection refused",
        done.stderr,
    ), done.stderr


class Stub:
    """A TLS stub answering what a test sets; it records what reached it."""

    def __init__(self) -> None:
        self.status = 202
        self.answer: Any = {"session": "s-1"}
        self.raw: bytes | None = None
        self.received: list[bytes] = []

    async def triggers(self, request: web.Request) -> web.StreamResponse:
        self.received.append(await request.read())
        if self.raw is not None:
            return web.Response(status=self.status, body=self.raw)
        return web.json_response(self.answer, status=self.status)

    async def challenge(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.answer, status=self.status)


@asynccontextmanager
async def stub_agent(folder: Path) -> AsyncIterator[tuple[Stub, str, str]]:
    pin = ensure_certificate(
        folder / "cert.pem", folder / "key.pem", common_name="stub", hosts=["127.0.0.1"]
    )
    stub = Stub()
    app = web.Application()
    app.router.add_post("/v1/triggers", stub.triggers)
    app.router.add_get("/v1/challenge", stub.challenge)
    runner = web.AppRunner(app)
    await runner.setup()
    ssl = server_context(folder / "cert.pem", folder / "key.pem")
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield stub, f"https://127.0.0.1:{port}", pin
    finally:
        await runner.cleanup()


async def run_async(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(run, capsys, *argv)


async def test_send_and_challenge_over_pinned_tls(
    envelope_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with stub_agent(tmp_path) as (stub, to, pin):
        send = ["trigger", "send", "--to", to, "--file", str(envelope_file)]
        # Accepted: the answer is printed, exit 0, the envelope arrived as signed.
        code, out, err = await run_async(capsys, *send, "--pin", pin)
        assert code == 0, err
        assert json.loads(out) == {"session": "s-1"}
        assert stub.received == [envelope_file.read_bytes().strip()]

        # Refused: the code and detail, exit 1 (control characters never reach the terminal).
        stub.status, stub.answer = 409, {"error": "replayed", "detail": "nonce already\x1b[2J used"}
        code, out, err = await run_async(capsys, *send, "--pin", pin)
        assert code == 1
        assert json.loads(out)["error"] == "replayed"
        assert "breakglass: error: replayed: nonce already?[2J used" in err

        # An answer that is too large is not read beyond the cap.
        stub.raw = b"x" * (200 * 1024)
        code, _, err = await run_async(capsys, *send, "--pin", pin)
        assert code == 1
        assert "with an answer larger than 65536 bytes" in err
        stub.raw = None

        # Another certificate than the pinned one: exit 2 and nothing is sent.
        sent = len(stub.received)
        code, out, err = await run_async(capsys, *send, "--pin", WRONG_PIN)
        assert (code, out) == (2, "")
        assert f"not the pinned {WRONG_PIN}; nothing was sent" in err
        assert len(stub.received) == sent

        # Challenge: the value alone on stdout.
        stub.status, stub.answer = 200, {"challenge": "Y2hhbGxlbmdlLWNoYWxsZW5nZQ"}
        code, out, err = await run_async(capsys, "trigger", "challenge", "--to", to, "--pin", pin)
        assert (code, out) == (0, "Y2hhbGxlbmdlLWNoYWxsZW5nZQ\n"), err
        stub.answer = {"challenge": "not a nonce!"}
        code, out, err = await run_async(capsys, "trigger", "challenge", "--to", to, "--pin", pin)
        assert (code, out) == (1, "")
        assert "without a usable challenge" in err


# -- the README's openssl-only recipe ----------------------------------------------------

RECIPE_MARK = "<!-- tested by tests/test_trigger_cli.py::test_readme_openssl_recipe -->"


def readme_recipe() -> str:
    """The README's marked shell blocks, in order."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(re.escape(RECIPE_MARK) + r"\n```sh\n(.*?)\n```", text, re.DOTALL)
    assert len(blocks) == 2, "the README's openssl recipe lost its markers"
    return "\n".join(blocks) + "\n"


def test_readme_openssl_recipe(
    district: District, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "dispatch"
    work.mkdir()
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_recipe()],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    keyring = district.keyring(f"{work / 'dispatch.pub'}:dispatch:all:County 911")
    body = (work / "trigger.json").read_bytes()
    result = verify(body, keyring)
    assert isinstance(result, Accepted), result
    assert (result.trigger.action, result.trigger.building, result.trigger.cameras) == (
        "start",
        BUILDING,
        None,
    )
    assert result.trigger.reason == "911 call: intruder reported"
    payload = (work / "payload.json").read_bytes()
    assert d.canonical(json.loads(payload)) == payload  # the canonical form, as DESIGN.md asks
    assert len(d.b64url_decode(result.trigger.nonce, what="nonce")) == 16
    # `breakglass trigger send` takes the file as it is (checked locally before sending).
    assert d.parse_envelope(body).payload == payload
