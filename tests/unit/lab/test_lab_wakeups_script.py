"""scripts/lab_wakeups.py names the lab's processes from their command lines (and nothing else)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "lab_wakeups.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lab_wakeups", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_kind_of_lab_process_is_named_by_its_member() -> None:
    name_of = _script().name_of
    run = "/work/main/.run/lab"
    assert name_of(f"/venv/bin/python -m hapki.cli.main serve cara --config {run}/config/cara-1.toml") == "cara:cara-1"
    assert name_of(f"/venv/bin/python -m hapki.cli.main serve watcher --config {run}/config/watcher-clm-2.toml") \
        == "watcher:watcher-clm-2"
    assert name_of(f"/venv/bin/nats-server --config {run}/nats-3/nats-server.conf") == "nats-server:nats-3"
    assert name_of(f"mariadbd --defaults-file={run}/db-2/my.cnf") == "mariadbd:db-2"
    assert name_of(f"haproxy -db -f {run}/clm-1/haproxy.cfg") == "haproxy:clm-1"
    assert name_of(f"keepalived -n -P -l -D -G -f {run}/cara-2/keepalived.conf -p {run}/cara-2/k.pid") \
        == "keepalived:cara-2"
    assert name_of("/usr/bin/prometheus --config.file=x") == "prometheus"
    assert name_of("/usr/sbin/sshd -D") is None and name_of("") is None
