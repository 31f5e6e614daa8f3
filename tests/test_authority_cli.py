"""``breakglass provision authority init | certify | revoke``: the district's signing tools."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from breakglass.cli import main
from provisioning.enrollment import parse_enrollment, parse_revocations
from provisioning.keys import kid, load_public_key, new_private_key, public_pem


def test_init_certify_and_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["provision", "authority", "init", "--out", str(tmp_path / "district")]) == 0
    key = tmp_path / "district" / "authority.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert main(["provision", "authority", "init", "--out", str(tmp_path / "district")]) == 2
    device = new_private_key(tmp_path / "device.key")
    cert = tmp_path / "enrollment.json"
    args = [
        "provision", "certify", "--authority", str(key), "--device", "lincoln-pi-1",
        "--device-key", str(tmp_path / "device.pub"), "--building", "lincoln-elementary",
        "--receiver-url", "wss://rx.example:8443/v1/uplink", "--receiver-pin", "sha256:" + "1" * 64,
        "--recipient", "age1" + "q" * 58, "--camera", "front-door=exterior",
        "--camera", "hallway-2=interior", "--out", str(cert),
    ]  # fmt: skip
    (tmp_path / "device.pub").write_bytes(public_pem(device.public_key()))
    assert main(args) == 0
    authority = load_public_key(tmp_path / "district" / "authority.pub")
    parsed = parse_enrollment(cert.read_text(), authority, now=time.time())
    assert parsed.cameras == {"front-door": "exterior", "hallway-2": "interior"}
    assert parsed.device_kid == kid(device.public_key())
    revocations = tmp_path / "revocations.json"
    revoke = ["provision", "revoke", "--authority", str(key), "--out", str(revocations)]
    # By device id alone (every key it had), as a technician knows it.
    assert main([*revoke, "lincoln-pi-1", "--version", "1"]) == 0
    listed = parse_revocations(json.loads(revocations.read_text()), authority)
    assert listed.revoked(parsed)
    assert (listed.devices, listed.kids) == ({"lincoln-pi-1"}, frozenset())
    # With its key id too: that key is refused under any other id as well.
    device_kid = kid(device.public_key())
    assert main([*revoke, f"lincoln-pi-1:{device_kid}", "lincoln-pi-7", "--version", "2"]) == 0
    listed = parse_revocations(json.loads(revocations.read_text()), authority)
    assert (listed.devices, listed.kids) == ({"lincoln-pi-1", "lincoln-pi-7"}, {device_kid})
    assert "(2 devices)" in capsys.readouterr().out
    for bad in ("lincoln-pi-1:XYZ", "Lincoln Pi", "lincoln-pi-1:"):
        assert main([*revoke, bad, "--version", "3"]) == 2
        assert f"device {bad!r}: expected ID or ID:KID" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        main([*args[:-4], "--camera", "gym=attic", "--out", str(cert)])
    assert bad.value.code == 2
    assert "ID=exterior or ID=interior" in capsys.readouterr().err
