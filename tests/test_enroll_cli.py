"""``breakglass provision enroll``: the plan file, camera specs and argument errors.

Everything here fails (or parses) before any network: no mDNS, no pairing.
The whole flow against real agents is in tests/test_first_boot.py and the
``enroll`` benchmark (tests/bench/enroll.py).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from breakglass.cli import main
from breakglass.enroll_cli import District, Target, camera_spec, load_plan

ROOT = Path(__file__).resolve().parents[1]
PIN = "sha256:" + "ab" * 32
DISTRICT_AGE = "age1" + "q" * 58
RECEIVER_AGE = "age1" + "p" * 58

HEADER = f"""authority = "district/authority.key"
receiver_url = "wss://police.example:8443/v1/uplink"
receiver_pin = "{PIN}"
recipients = ["{DISTRICT_AGE}", "{RECEIVER_AGE}"]
"""

DEVICE = """
[[devices]]
id = "bg-3f2a9c0d11aa"
setup_code = "1234-5678"
building = "lincoln-elementary"
cameras = ["front-door=exterior,rtsp://10.0.0.20/stream1", "hall-2=interior"]
"""


#: A second device of the plan (its own id: an id listed twice is an error of its own).
SECOND = DEVICE.replace("bg-3f2a9c0d11aa", "bg-000000000002")


def write_plan(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site" / "plan.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def plan_error(tmp_path: Path, text: str) -> str:
    """The message of the ValueError that ``load_plan`` raises for ``text``."""
    path = write_plan(tmp_path, text)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: ") as refused:
        load_plan(path)  # every message names the file
    return str(refused.value).removeprefix(f"{path}: ")


# -- camera specs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "front-door=exterior,rtsp://10.0.0.20/stream1",
            ("front-door", "exterior", {"id": "front-door", "source": "rtsp",
                                        "url": "rtsp://10.0.0.20/stream1"}),
        ),
        (
            "gym=exterior,rtsps://viewer:pw@10.0.0.21:322/s",
            ("gym", "exterior", {"id": "gym", "source": "rtsp",
                                 "url": "rtsps://viewer:pw@10.0.0.21:322/s"}),
        ),
        ("hall-2=interior", ("hall-2", "interior", {"id": "hall-2", "source": "picamera"})),
        ("hall-2=interior,picamera",
         ("hall-2", "interior", {"id": "hall-2", "source": "picamera"})),
        ("cam_3=interior,synthetic", ("cam_3", "interior", {"id": "cam_3", "source": "synthetic"})),
        ("9=exterior", ("9", "exterior", {"id": "9", "source": "picamera"})),
    ],
)  # fmt: skip
def test_camera_spec_parses_id_zone_and_source(
    spec: str, expected: tuple[str, str, dict[str, str]]
) -> None:
    assert camera_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("hall-2", "expected ID=exterior|interior[,SOURCE]"),
        ("hall-2=", "expected ID=exterior|interior[,SOURCE]"),
        ("hall-2=lobby", "expected ID=exterior|interior[,SOURCE]"),
        ("hall-2=Interior", "expected ID=exterior|interior[,SOURCE]"),
        ("=interior", "expected ID=exterior|interior[,SOURCE]"),
        ("Hall-2=interior", "expected ID=exterior|interior[,SOURCE]"),
        ("-hall=interior", "expected ID=exterior|interior[,SOURCE]"),
        ("hall 2=interior", "expected ID=exterior|interior[,SOURCE]"),
        ("x" * 33 + "=interior", "expected ID=exterior|interior[,SOURCE]"),
        ("hall-2=interior,http://10.0.0.20/s", "SOURCE is rtsp://..., picamera or synthetic"),
        ("hall-2=interior,file", "SOURCE is rtsp://..., picamera or synthetic"),
        ("hall-2=interior,RTSP://10.0.0.20/s", "SOURCE is rtsp://..., picamera or synthetic"),
    ],
)
def test_a_bad_camera_spec_is_an_argument_error_that_quotes_it(spec: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        camera_spec(spec)
    assert str(refused.value) == f"{spec!r}: {says}"


# -- the plan file ---------------------------------------------------------------------


def test_a_plan_gives_the_district_and_every_device(tmp_path: Path) -> None:
    text = HEADER + 'trigger_keys = "district/trigger-keys.json"\nretention_h = 48\n'
    text += 'interface = "10.0.0.23"\n' + DEVICE
    text += """
[[devices]]
id = "lincoln-pi-2"
setup_code = "8765 4321"
building = "lincoln-annex"
cameras = ["gym=interior,synthetic"]
to = "https://10.0.0.31:8443"
"""
    path = write_plan(tmp_path, text)
    district, targets = load_plan(path)
    site = path.parent
    assert district == District(
        authority=site / "district" / "authority.key",  # relative to the plan
        receiver_url="wss://police.example:8443/v1/uplink",
        receiver_pin=PIN,
        recipients=(DISTRICT_AGE, RECEIVER_AGE),
        retention_h=48.0,
        trigger_keys=site / "district" / "trigger-keys.json",
        interfaces=("10.0.0.23",),
    )
    assert targets == [
        Target(
            device="bg-3f2a9c0d11aa",
            setup_code="12345678",  # as typed on the label, normalised
            building="lincoln-elementary",
            cameras=(
                ("front-door", "exterior", {"id": "front-door", "source": "rtsp",
                                            "url": "rtsp://10.0.0.20/stream1"}),
                ("hall-2", "interior", {"id": "hall-2", "source": "picamera"}),
            ),
        ),
        Target(
            device="lincoln-pi-2",
            setup_code="87654321",
            building="lincoln-annex",
            cameras=(("gym", "interior", {"id": "gym", "source": "synthetic"}),),
            to="https://10.0.0.31:8443",
        ),
    ]  # fmt: skip


def test_plan_defaults_and_the_interfaces_list(tmp_path: Path) -> None:
    district, targets = load_plan(write_plan(tmp_path, HEADER + DEVICE))
    assert district.retention_h == 72.0
    assert district.trigger_keys is None
    assert district.interfaces == ("127.0.0.1",)  # nothing leaves the machine by default
    assert [t.to for t in targets] == [None]  # found by mDNS
    many = HEADER + 'interfaces = ["10.0.0.23", "10.1.0.23"]\n' + DEVICE
    assert load_plan(write_plan(tmp_path, many))[0].interfaces == ("10.0.0.23", "10.1.0.23")


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("authority", "authority"),
        ("receiver_url", "receiver_url"),
        ("receiver_pin", "receiver_pin"),
    ],
)
def test_a_missing_district_key_is_named(tmp_path: Path, key: str, named: str) -> None:
    text = "\n".join(line for line in HEADER.splitlines() if not line.startswith(key))
    assert plan_error(tmp_path, text + "\n" + DEVICE) == f"{named}: missing or not a string"


@pytest.mark.parametrize("key", ["id", "setup_code", "building"])
def test_a_missing_device_key_is_named_with_its_device(tmp_path: Path, key: str) -> None:
    device = "\n".join(line for line in SECOND.splitlines() if not line.startswith(key))
    message = plan_error(tmp_path, HEADER + DEVICE + device + "\n")
    assert message == f"devices[1].{key}: missing or not a string"


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ('authority = ""', "authority"),
        ("authority = 3", "authority"),
        ('receiver_url = ["wss://police.example:8443/v1/uplink"]', "receiver_url"),
        ("receiver_pin = false", "receiver_pin"),
    ],
)
def test_a_district_key_of_the_wrong_kind_is_named(tmp_path: Path, line: str, named: str) -> None:
    key = line.split(" = ")[0]
    text = "\n".join(x for x in HEADER.splitlines() if not x.startswith(key)) + f"\n{line}\n"
    assert plan_error(tmp_path, text + DEVICE) == f"{named}: missing or not a string"


def test_a_setup_code_that_is_not_a_string_is_named(tmp_path: Path) -> None:
    device = DEVICE.replace('setup_code = "1234-5678"', "setup_code = 12345678")
    assert plan_error(tmp_path, HEADER + device) == "devices[0].setup_code: missing or not a string"


@pytest.mark.parametrize(
    "code",
    ["12", "1234-567", "1234-56789", "abcd-efgh", "1234_5678", "\u0661\u0662\u0663\u0664-5678"],
)
def test_a_bad_setup_code_names_its_device(tmp_path: Path, code: str) -> None:
    device = SECOND.replace("1234-5678", code)
    message = plan_error(tmp_path, HEADER + DEVICE + device)
    assert message == "devices[1].setup_code: a setup code is 8 digits", message


@pytest.mark.parametrize(
    "camera", ["hall-2=lobby", "hall-2", "Hall=interior", "hall-2=interior,http://x"]
)
def test_a_bad_camera_spec_names_its_device_and_quotes_the_spec(
    tmp_path: Path, camera: str
) -> None:
    device = SECOND.replace('"hall-2=interior"', f'"{camera}"')
    message = plan_error(tmp_path, HEADER + DEVICE + device)
    assert message.startswith("devices[1].cameras: "), message
    assert repr(camera) in message


@pytest.mark.parametrize("devices", ["", "devices = []\n"])
def test_a_plan_without_devices_is_refused(tmp_path: Path, devices: str) -> None:
    assert plan_error(tmp_path, HEADER + devices) == "devices: no [[devices]] to enroll"


def test_an_unreadable_or_malformed_plan_is_refused_with_its_path(tmp_path: Path) -> None:
    assert "Expected" in plan_error(tmp_path, HEADER + "[[devices]\n")  # TOML syntax
    missing = tmp_path / "nowhere" / "plan.toml"
    with pytest.raises(ValueError, match=f"^{re.escape(str(missing))}: "):
        load_plan(missing)
    binary = write_plan(tmp_path, "")
    binary.write_bytes(b'authority = "\xff\xfe"\n')
    with pytest.raises(ValueError, match=f"^{re.escape(str(binary))}: "):
        load_plan(binary)


# -- the command: exit code 2 and one clear line, before any network -------------------


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["provision", *argv])
    return code, capsys.readouterr().err


def test_enroll_with_a_bad_plan_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device = DEVICE.replace('building = "lincoln-elementary"\n', "")
    path = write_plan(tmp_path, HEADER + device)
    code, err = run_main(capsys, "enroll", "--plan", str(path))
    says = f"{path}: devices[0].building: missing or not a string"
    assert (code, err) == (2, f"breakglass: error: {says}\n")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (HEADER, "devices: no [[devices]] to enroll"),
        (HEADER + DEVICE.replace("1234-5678", "1234"), "setup_code: a setup code is 8 digits"),
        (HEADER + DEVICE.replace("hall-2=interior", "hall-2=hallway"), "'hall-2=hallway'"),
    ],
)
def test_enroll_plan_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: str
) -> None:
    path = write_plan(tmp_path, text)
    code, err = run_main(capsys, "enroll", "--plan", str(path))
    assert code == 2
    assert err.startswith(f"breakglass: error: {path}: ")
    assert says in err
    assert err.count("\n") == 1  # one line, no traceback


def test_enroll_of_a_missing_plan_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "plan.toml"
    code, err = run_main(capsys, "enroll", "--plan", str(missing))
    assert code == 2
    assert err.startswith(f"breakglass: error: {missing}: ")


ONE = ["bg-3f2a9c0d11aa", "--setup-code", "1234-5678"]
SETUP = ["--receiver-url", "wss://police.example:8443/v1/uplink", "--receiver-pin", PIN,
         "--recipient", DISTRICT_AGE]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "give DEVICE and --setup-code, or --plan FILE"),
        (["bg-3f2a9c0d11aa"], "give DEVICE and --setup-code, or --plan FILE"),
        (["--setup-code", "1234-5678"], "give DEVICE and --setup-code, or --plan FILE"),
        (ONE, "enroll needs --authority, --receiver-url, --receiver-pin, --recipient"),
        (ONE + SETUP[:4], "enroll needs --authority, --receiver-url, --receiver-pin, --recipient"),
        (ONE + SETUP, "enroll needs --authority (the district authority's key)"),
        (ONE + SETUP + ["--authority", "a.key"],
         "enroll needs --building and at least one --camera"),
        (ONE + SETUP + ["--authority", "a.key", "--building", "lincoln-elementary"],
         "enroll needs --building and at least one --camera"),
        (ONE + SETUP + ["--authority", "a.key", "--camera", "hall-2=interior"],
         "enroll needs --building and at least one --camera"),
        (["bg-3f2a9c0d11aa", "--setup-code", "12-34", *SETUP, "--authority", "a.key",
          "--building", "lincoln-elementary", "--camera", "hall-2=interior"],
         "bad_code: a setup code is 8 digits"),
    ],
)  # fmt: skip
def test_enroll_argument_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    code, err = run_main(capsys, "enroll", *argv)
    assert (code, err) == (2, f"breakglass: error: {says}\n")


@pytest.mark.parametrize(
    ("camera", "says"),
    [
        ("hall-2=lobby", "expected ID=exterior|interior[,SOURCE]"),
        ("hall-2=interior,ftp://x", "SOURCE is rtsp://..., picamera or synthetic"),
    ],
)
def test_a_bad_camera_argument_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], camera: str, says: str
) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["provision", "enroll", *ONE, "--camera", camera])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --camera: {camera!r}: {says}" in err


def test_the_console_command_reports_a_plan_error_with_exit_2(tmp_path: Path) -> None:
    path = write_plan(tmp_path, HEADER.replace('receiver_pin = "', 'receiver_pn = "') + DEVICE)
    done = subprocess.run(
        [sys.executable, "-m", "breakglass", "provision", "enroll", "--plan", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == f"breakglass: error: {path}: receiver_pn: unknown key (misspelt?)\n"
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('recipients = "age1xyz"', "recipients: expected a non-empty list of strings"),
        ("recipients = [1, 2]", "recipients[0]: '1' does not match"),
        ('retention_h = "x"', "retention_h: expected a number of hours"),
        ("retention_h = [1]", "retention_h: expected a number of hours"),
        ('triger_keys = "k.json"', "triger_keys: unknown key (misspelt?)"),
        ('interface = ["10.0.0.5"]', "interface: missing or not a string"),
        ('devices = ["x"]', "devices[0]: expected a table ([[devices]])"),
    ],
)
def test_plan_values_are_checked_when_the_plan_is_read(
    tmp_path: Path, line: str, says: str
) -> None:
    key = line.split(" = ")[0]
    header = "\n".join(x for x in HEADER.splitlines() if not x.startswith(key + " "))
    devices = "" if key == "devices" else DEVICE
    assert plan_error(tmp_path, f"{line}\n{header}\n{devices}").startswith(says)


def test_a_device_listed_twice_is_refused(tmp_path: Path) -> None:
    message = plan_error(tmp_path, HEADER + DEVICE + DEVICE)
    assert message == "devices[1].id: bg-3f2a9c0d11aa is listed twice"


def test_a_device_table_with_a_misspelt_key_is_refused(tmp_path: Path) -> None:
    device = DEVICE.replace("building =", "buidling =")
    assert plan_error(tmp_path, HEADER + device) == "devices[0].buidling: unknown key (misspelt?)"


# -- check and rotate: each reads only its own options ---------------------------------


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["check"], "give DEVICE and --setup-code, or --plan FILE"),
        (["check", "bg-3f2a9c0d11aa"], "give DEVICE and --setup-code, or --plan FILE"),
        (["check", "bg-3f2a9c0d11aa", "--setup-code", "12-34"],
         "bad_code: a setup code is 8 digits"),
        (["rotate", *ONE], "rotate needs --authority (the district authority's key)"),
        (["rotate", "bg-3f2a9c0d11aa", "--setup-code", "12-34", "--authority", "a.key"],
         "bad_code: a setup code is 8 digits"),
    ],
)  # fmt: skip
def test_check_and_rotate_argument_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    code, err = run_main(capsys, *argv)
    assert (code, err) == (2, f"breakglass: error: {says}\n")


@pytest.mark.parametrize(
    "argv",
    [
        ["check", *ONE, "--authority", "a.key"],  # check signs nothing
        ["check", *ONE, "--building", "lincoln-elementary"],
        ["check", *ONE, "--version", "2"],
        ["rotate", *ONE, "--building", "lincoln-elementary"],  # kept from the certificate
        ["rotate", *ONE, "--camera", "hall-2=interior"],
        ["rotate", *ONE, "--retention-h", "48"],
        ["enroll", *ONE, "--out", "shots"],
    ],
)
def test_an_option_of_another_subcommand_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["provision", *argv])
    assert usage.value.code == 2
    assert "unrecognized arguments: " + argv[-2] in capsys.readouterr().err
