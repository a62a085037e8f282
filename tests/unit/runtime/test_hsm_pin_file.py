"""The HSM PIN file must be readable by the service user only: the pool refuses to open otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hapki.runtime.config import require_owner_only
from hapki.runtime.hsm import HSMMemberConfig, HSMPool, _read_pin


def _pin(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / f"pin-{mode:o}"
    path.write_text("1234\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666, 0o601, 0o610])
def test_a_pin_file_others_may_access_stops_the_pool(tmp_path: Path, mode: int) -> None:
    pin = _pin(tmp_path, mode)
    pool = HSMPool([HSMMemberConfig("hsm-a", str(tmp_path / "no-module.so"), "t", pin)])
    with pytest.raises(ValueError, match=rf"HSM member hsm-a: PIN file {pin} is accessible to group or others "
                                         rf"\(mode 0{mode:o}\).*chmod 600"):
        pool.open()  # refused before any library is loaded (the module path does not even exist)
    with pytest.raises(PermissionError, match="accessible to group or others"):
        _read_pin(pin)  # a file changed after the start: that member goes down, with this reason logged


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_an_owner_only_pin_file_is_read(tmp_path: Path, mode: int) -> None:
    pin = _pin(tmp_path, mode)
    require_owner_only(pin, "PIN file")
    assert _read_pin(pin) == "1234"


def test_a_pin_file_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin = _pin(tmp_path, 0o600)
    monkeypatch.setattr(os, "geteuid", lambda: pin.stat().st_uid + 1)  # as if the service ran as another user
    with pytest.raises(ValueError, match="not to the service user"):
        require_owner_only(pin, "PIN file")


def test_a_missing_pin_file_only_keeps_the_member_down(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        require_owner_only(tmp_path / "missing", "PIN file")
