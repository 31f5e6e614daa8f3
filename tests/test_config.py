"""Config validation: every error names the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pyrage
import pytest

from agent.config import load_config
from agent.errors import ConfigError

PIN = "sha256:" + "ab" * 32
RECIPIENT = str(pyrage.x25519.Identity.generate().to_public())

GOOD = f"""
[device]
id = "pi-1"
key = "device.key"

[building]
id = "lincoln"

[receiver]
url = "wss://127.0.0.1:8443/v1/uplink"
tls_pin = "{PIN}"

[store]
recipients = ["{RECIPIENT}"]

[[buttons]]
id = "office"
pin = 17
location = "Main office"

[[cameras]]
id = "front"
zone = "exterior"
source = "synthetic"

[[cameras]]
id = "hall"
zone = "interior"
source = "synthetic"
fps = 30
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_good_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.device_key == tmp_path / "device.key"
    assert cfg.state_dir == tmp_path / "state"
    assert [c.zone for c in cfg.cameras] == ["exterior", "interior"]
    assert cfg.cameras[1].fps == 30.0
    assert cfg.preroll_s == 30.0 and cfg.session_duration_s == 3600.0
    assert cfg.receiver_origin == "wss://127.0.0.1:8443"
    assert cfg.buttons[0].location == "Main office"
    assert cfg.store.directory == tmp_path / "store"
    assert cfg.store.recipients == (RECIPIENT,) and cfg.store.max_age_s == 72 * 3600


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        (
            ('zone = "interior"', 'zone = "inside"'),
            "cameras[1].zone",
            "must be 'exterior' or 'interior'",
        ),
        (("fps = 30", 'fps = "fast"'), "cameras[1].fps", "must be a number"),
        (("fps = 30", "fps = 1000"), "cameras[1].fps", "outside"),
        (("fps = 30", "fsp = 30"), "cameras[1].fsp", "unknown key"),
        (('url = "wss://', 'url = "http://'), "receiver.url", "wss://"),
        ((f'tls_pin = "{PIN}"', 'tls_pin = "abc"'), "receiver.tls_pin", "does not match"),
        (("pin = 17", "pin = 99"), "buttons[0].pin", "does not exist"),
        (('id = "pi-1"', 'id = "Pi 1"'), "device.id", "does not match"),
        (
            ("[building]", "[gpio]\nled_pin = 17\n\n[building]"),
            "buttons[0].pin",
            "pin 17 is already used by gpio.led_pin",
        ),
        (
            ("[building]", '[gpio]\nled_pin = 5\nbuzzer_pin = "BCM5"\n\n[building]'),
            "gpio.buzzer_pin",
            "pin 'BCM5' is already used by gpio.led_pin",
        ),
        (
            (
                'location = "Main office"',
                'location = "Main office"\n\n[[buttons]]\nid = "gym"\npin = "GPIO17"\n'
                'location = "Gym"',
            ),
            "buttons[1].pin",
            "pin 'GPIO17' is already used by buttons[0].pin",
        ),
        (('id = "hall"', 'id = "front"'), "cameras[1].id", "used twice"),
        (('key = "device.key"', ""), "device.key", "missing"),
        (("[building]", "[buildin]"), "buildin", "unknown key"),
        ((f'["{RECIPIENT}"]', '["age1notakey"]'), "store.recipients[0]", "not an age X25519"),
        ((f'["{RECIPIENT}"]', "[]"), "store.recipients", "age recipients are needed"),
        ((f'recipients = ["{RECIPIENT}"]', ""), "store.recipients", "missing"),
        ((f'["{RECIPIENT}"]', f'["{RECIPIENT}", 7]'), "store.recipients[1]", "must be a string"),
        (('source = "synthetic"\n\n', 'source = "webcam"\n\n'), "cameras[0].source", "not one of"),
        (
            ('source = "synthetic"\n\n', 'source = "rtsp"\n\n'),
            "cameras[0].url",
            "missing (required)",
        ),
        (
            ('source = "synthetic"\n\n', 'source = "rtsp"\nurl = "http://cam"\n\n'),
            "cameras[0].url",
            "rtsp://",
        ),
        (('source = "synthetic"\n\n', 'source = "file"\n\n'), "cameras[0].path", "missing"),
    ],
)
def test_bad_config_names_the_key(
    tmp_path: Path, change: tuple[str, str], key: str, reason: str
) -> None:
    old, new = change
    assert old in GOOD
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD.replace(old, new, 1)))
    assert info.value.key == key
    assert key in str(info.value) and reason in str(info.value)
    assert str(tmp_path / "agent.toml") in str(info.value)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[device\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_no_cameras_is_an_error(tmp_path: Path) -> None:
    text = GOOD[: GOOD.index("[[cameras]]")]
    with pytest.raises(ConfigError, match="at least one"):
        load_config(write(tmp_path, text))


def test_the_example_config_is_valid(tmp_path: Path) -> None:
    """docs/agent.example.toml stays in step with the validator (keys filled in)."""
    example = Path(__file__).resolve().parent.parent / "docs" / "agent.example.toml"
    text = example.read_text()
    text = text.replace('"age1qqqq...district", "age1qqqq...receiver"', f'"{RECIPIENT}"')
    cfg = load_config(write(tmp_path, text))
    assert [c.source for c in cfg.cameras] == ["rtsp", "picamera"]
    assert cfg.store.segment_s == 4.0 and cfg.store.quota_bytes == 8192 * 1024 * 1024
    assert cfg.trust.authority is not None and cfg.trust.authority.name == "district-authority.pub"
    assert (cfg.local_api.host, cfg.local_api.port) == ("0.0.0.0", 8443)


def test_a_trigger_key_list_needs_the_authority_that_signed_it(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "docs" / "agent.example.toml"
    text = example.read_text()
    text = text.replace('"age1qqqq...district", "age1qqqq...receiver"', f'"{RECIPIENT}"')
    text = text.replace('authority = "district-authority.pub"\n', "")
    with pytest.raises(ConfigError, match=r"trust.*trigger_keys.*authority"):
        load_config(write(tmp_path, text))
