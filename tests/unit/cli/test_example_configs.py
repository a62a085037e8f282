"""The example configs in compose/config load with the services' strict models."""

from __future__ import annotations

from pathlib import Path

import pytest

from hapki.cara.config import CaraConfig
from hapki.contracts.errors import ConfigInvalid
from hapki.clm.config import ClmConfig
from hapki.runtime.config import load_toml
from hapki.watcher.main import WatcherConfig

CONFIG = Path(__file__).resolve().parents[3] / "compose" / "config"


@pytest.mark.parametrize(("name", "model"), [("clm", ClmConfig), ("cara", CaraConfig), ("watcher", WatcherConfig)])
def test_example_config_loads(name: str, model: type) -> None:
    config = load_toml(CONFIG / f"{name}.toml", model)
    assert config.member.endswith("-1")


def test_unknown_fields_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "clm.toml"
    bad.write_text((CONFIG / "clm.toml").read_text() + "\nsurprise = 1\n")
    with pytest.raises(ConfigInvalid, match="surprise: Extra inputs are not permitted"):
        load_toml(bad, ClmConfig)
