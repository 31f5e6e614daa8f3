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
    target = f"lincoln-pi-1:{kid(device.public_key())}"
    revoke = ["provision", "revoke", "--authority", str(key), "--device", target]
    assert main([*revoke, "--version", "1", "--out", str(revocations)]) == 0
    assert parse_revocations(json.loads(revocations.read_text()), authority).revoked(parsed)
    with pytest.raises(SystemExit) as bad:
        main([*args[:-4], "--camera", "gym=attic", "--out", str(cert)])
    assert bad.value.code == 2
    assert "ID=exterior or ID=interior" in capsys.readouterr().err
