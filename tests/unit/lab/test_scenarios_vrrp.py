"""A fault that cannot find the tier's active member says why, from the members' keepalived logs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from hapki.lab import scenarios
from hapki.lab.topology import default


def test_no_single_vip_holder_is_refused_with_the_vrrp_story(tmp_path: Path) -> None:
    (tmp_path / "cara-1").mkdir()
    (tmp_path / "cara-1" / "keepalived.log").write_text(
        "Sat: (hapki_cara) Sending gratuitous ARP on eth0 for 10.213.2.100\n"
        "Sat: Script `hapki_cara_fit` now returning 22\n"
        "Sat: (hapki_cara) Changing effective priority from 150 to 50\n"
        "Sat: (hapki_cara) Entering BACKUP STATE\n"
        "Sat: (hapki_cara) removing VIPs.\n")
    lab = SimpleNamespace(topo=default(), base_dir=tmp_path, vip_holders=lambda tier: [])
    with pytest.raises(RuntimeError) as refused:
        scenarios._active(lab, "cara")  # noqa: SLF001
    text = str(refused.value)
    assert "the cara VIP is held by [], not by one member" in text
    assert "cara-1: Sat: Script `hapki_cara_fit` now returning 22" in text
    assert "cara-1: Sat: (hapki_cara) Entering BACKUP STATE" in text and "gratuitous" not in text
    assert "cara-2: " in text and "keepalived.log" in text  # its log is missing: said so, not skipped
    assert scenarios._active(SimpleNamespace(vip_holders=lambda tier: ["cara-2"]), "cara") == "cara-2"  # noqa: SLF001
