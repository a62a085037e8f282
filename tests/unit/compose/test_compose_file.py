"""compose/docker-compose.yml: current, valid by the Compose specification, and every reference resolves.

Docker cannot run on these machines, so the demo is checked statically: the committed files are what
`hapki compose render` makes from compose/topology.toml now, the file validates against the Compose
specification's JSON schema (vendored in compose/schema/), and everything it names exists: build contexts,
Dockerfiles and their stages and COPY sources, bind-mounted files, volumes, networks, services it depends on,
addresses inside their networks, scrape targets.
"""

from __future__ import annotations

import copy
import json
import re
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from hapki.lab import compose
from hapki.lab.topology import default

COMPOSE = compose.COMPOSE_DIR
REPO = COMPOSE.parent
SCHEMA = COMPOSE / "schema" / "compose-spec.json"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


def test_committed_compose_demo_is_current() -> None:
    problems = compose.check(default())
    assert not problems, "the compose demo is stale, run `hapki compose render`:\n" + "\n".join(problems)


def test_check_notices_a_stale_file(tmp_path: Path) -> None:
    topo = default()
    compose.write(topo, tmp_path)
    assert compose.check(topo, tmp_path) == []
    (tmp_path / "rendered" / "db-2" / "galera.cnf").write_text("edited by hand\n")
    (tmp_path / "rendered" / "db-9").mkdir()
    (tmp_path / "rendered" / "db-9" / "galera.cnf").write_text("left over\n")
    assert compose.check(topo, tmp_path) == ["rendered/db-2/galera.cnf: stale",
                                             "rendered/db-9/galera.cnf: not rendered any more"]


def test_validates_against_the_compose_specification(doc: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(doc)
    # The schema is strict enough to catch a mistake: an unknown key and a wrong depends_on condition fail.
    bad = copy.deepcopy(doc)
    bad["services"]["db-2"]["depends_on"]["db-1"]["condition"] = "service_ready"
    bad["services"]["cara-1"]["capabilities"] = ["NET_ADMIN"]
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(bad))
    assert len(errors) == 2


def test_the_topology_becomes_the_containers(doc: dict[str, Any]) -> None:
    topo = default()
    services = doc["services"]
    for tier, t in topo.tiers.items():
        for member in t.members:
            svc = services[member]
            assert svc["cap_add"] == ["NET_ADMIN", "NET_RAW"]
            home = topo.members[member].segment
            assert svc["networks"][home] == {"ipv4_address": str(topo.address(member)), "interface_name": "eth0",
                                             "priority": 1000}
            assert services[f"watcher-{member}"]["network_mode"] == f"service:{member}"
            assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
            assert ("hsm-a" in {v["source"] for v in svc["volumes"]}) == (tier == "cara")
        # The VIP is on the members' subnet and reserved, so Docker never gives it to a container.
        net = doc["networks"][topo.members[t.members[0]].segment]["ipam"]["config"][0]
        assert IPv4Address(str(t.vip)) in IPv4Network(net["subnet"])
        assert net["aux_addresses"][f"{tier}-vip"] == str(t.vip)
    # CLM reaches the CARA VIP and the data segment, CARA the data segment (the topology's flows).
    assert set(services["clm-1"]["networks"]) == {"clm", "cara", "data"}
    assert set(services["cara-1"]["networks"]) == {"cara", "data"}
    # The bus members' Go scheduler threads, as the native lab runs them ([bus] gomaxprocs).
    for bus in topo.members_by_role("nats"):
        assert services[bus]["environment"] == {"GOMAXPROCS": str(topo.bus.gomaxprocs)}
    # Galera: db-1 bootstraps; each joiner waits for the node before it to be healthy.
    assert services["db-1"]["environment"]["GALERA_BOOTSTRAP"] == "1"
    assert services["db-2"]["depends_on"]["db-1"] == {"condition": "service_healthy"}
    assert services["db-3"]["depends_on"]["db-2"] == {"condition": "service_healthy"}
    for name in ("db-1", "nats-1"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    assert services["provision"]["depends_on"]["nats-3"] == {"condition": "service_healthy"}
    assert services["cara-1"]["depends_on"]["provision"] == {"condition": "service_completed_successfully"}
    assert {"hsm-a", "hsm-b"} <= set(doc["volumes"])
    # Each container's secrets are its own volume; only init mounts them all (and the CA key's).
    secrets_of = {v["source"] for v in services["cara-1"]["volumes"] if v["source"].startswith("secrets-")}
    assert secrets_of == {"secrets-cara-1"}
    assert {v["source"] for v in services["init"]["volumes"]} >= {"secrets-_issuer", "secrets-db-1", "secrets-grafana"}
    assert not [s for s in services.values() for v in s.get("volumes", []) if "volume" in v], "no volume subpaths"
    assert {"otel-collector", "jaeger", "prometheus", "grafana"} <= set(services)


def _stages(dockerfile: Path) -> set[str]:
    return set(re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text()))


def _copies(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"^COPY\s+(?!--from)(.+)$", line.strip())
        if m:
            sources += m.group(1).split()[:-1]
    return sources


def test_every_build_context_dockerfile_stage_and_copied_file_exists(doc: dict[str, Any]) -> None:
    built = 0
    for name, svc in doc["services"].items():
        if "build" not in svc:
            image = svc["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag: {image}"
            continue
        built += 1
        context = (COMPOSE / svc["build"]["context"]).resolve()
        assert context == REPO, name
        dockerfile = context / svc["build"]["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile}"
        assert svc["build"]["target"] in _stages(dockerfile), f"{name}: no stage {svc['build']['target']}"
        assert "python:3.11-slim-bookworm" in dockerfile.read_text()
        for source in _copies(dockerfile):
            assert (context / source).exists(), f"{dockerfile}: COPY {source} does not exist"
        for arg in svc["build"].get("args", {}):
            assert re.search(rf"(?m)^ARG {arg}\b", dockerfile.read_text()), f"{dockerfile}: no ARG {arg}"
    assert built >= 4 + 4 + 3 + 3  # members, watchers, Galera, NATS (and init, provision)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_every_mount_network_and_dependency_resolves(doc: dict[str, Any]) -> None:
    services, volumes, networks = doc["services"], doc["volumes"], doc["networks"]
    used_volumes = set()
    for name, svc in services.items():
        for mount in svc.get("volumes", []):
            if mount["type"] == "bind":
                assert (COMPOSE / mount["source"]).exists(), f"{name}: {mount['source']} does not exist"
                assert mount.get("read_only") is True, f"{name}: rendered files are mounted read-only"
            else:
                assert mount["source"] in volumes, f"{name}: undeclared volume {mount['source']}"
                used_volumes.add(mount["source"])
        nets = svc.get("networks", {})
        for net, attach in (nets.items() if isinstance(nets, dict) else ((n, None) for n in nets)):
            assert net in networks, f"{name}: undeclared network {net}"
            if attach and "ipv4_address" in attach:
                config = networks[net]["ipam"]["config"][0]
                address = IPv4Address(attach["ipv4_address"])
                assert address in IPv4Network(config["subnet"]), f"{name}: {address} outside {net}"
                assert address not in IPv4Network(config["ip_range"]), f"{name}: {address} in the dynamic range"
                assert str(address) not in config.get("aux_addresses", {}).values()
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        if "network_mode" in svc and svc["network_mode"].startswith("service:"):
            assert svc["network_mode"].removeprefix("service:") in services
        published = [p["published"] for p in svc.get("ports", [])]
        assert all(p["host_ip"] == "127.0.0.1" for p in svc.get("ports", [])), f"{name}: publish on loopback only"
        assert len(published) == len(set(published))
    assert used_volumes == set(volumes), "declared volumes nobody mounts"
    all_published = [p["published"] for s in services.values() for p in s.get("ports", [])]
    assert sorted(all_published) == sorted(set(all_published))
    assert (COMPOSE / "grafana" / "dashboards").is_dir()


def test_prometheus_scrapes_every_service_on_its_member_address() -> None:
    topo = default()
    config = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    targets = {(job["job_name"], t) for job in config["scrape_configs"]
               for sc in job["static_configs"] for t in sc["targets"]}
    for tier, t in topo.tiers.items():
        for member in t.members:
            address = topo.address(member)
            assert (tier, f"{address}:{compose.METRICS_PORTS[tier]}") in targets
            assert ("watcher", f"{address}:{compose.METRICS_PORTS['watcher']}") in targets
    assert compose.METRICS_PORTS == {"cara": 9101, "clm": 9102, "watcher": 9103}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])


def test_grafana_provisions_both_datasources_and_the_dashboard_folder() -> None:
    sources = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/datasources.yaml").read_text())
    assert {(d["type"], d["url"]) for d in sources["datasources"]} == {
        ("prometheus", "http://prometheus:9090"), ("jaeger", "http://jaeger:16686")}
    providers = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/dashboards.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    collector = yaml.safe_load((COMPOSE / "otel" / "collector.yaml").read_text())
    assert collector["service"]["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]


def test_cli_check_says_current_or_stale(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    from hapki.cli.main import main

    assert main(["compose", "render", "--check"]) == 0
    monkeypatch.setattr(compose, "COMPOSE_DIR", tmp_path)  # an empty checkout: everything missing
    assert main(["compose", "render", "--check"]) == 1
    assert "docker-compose.yml: missing" in capsys.readouterr().err


def test_image_scripts_parse_and_are_what_the_compose_file_runs(doc: dict[str, Any]) -> None:
    import subprocess

    scripts = sorted((COMPOSE / "images").rglob("*.sh"))
    assert len(scripts) == 3
    for script in scripts:
        shell = "bash" if script.read_text().startswith("#!/bin/bash") else "sh"
        result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert script.stat().st_mode & 0o111, f"{script} is not executable"
    # What each container runs (the image's ENTRYPOINT, inherited along FROM <stage>, then the command) starts
    # with a program the image has: a script its Dockerfile installs, or one of the known binaries.
    installed = {"hapki", "nats-server", "python"}
    for dockerfile in (COMPOSE / "images").rglob("Dockerfile"):
        installed |= {Path(t).name for t in re.findall(r"(?m)^COPY\s+\S+\.sh\s+(\S+)$", dockerfile.read_text())}
    for name, svc in doc["services"].items():
        if "build" not in svc:
            continue
        argv = [*_entrypoint(REPO / svc["build"]["dockerfile"], svc["build"]["target"]), *svc.get("command", [])]
        assert argv and argv[0] in installed, f"{name} runs {argv}"
        assert argv.count(argv[0]) == 1, f"{name} names its program twice: {argv}"
        health = svc.get("healthcheck", {}).get("test", [])
        if health:
            assert health[1] in installed, f"{name}: health check {health}"


def _entrypoint(dockerfile: Path, target: str) -> list[str]:
    """The ENTRYPOINT of stage ``target`` (inherited from the stage it is built FROM), [] if none."""
    stages: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"(?i)^FROM\s+(\S+)\s+AS\s+(\S+)", line)
        if m:
            current = m.group(2)
            stages[current] = (m.group(1), [])
        elif current and line.startswith("ENTRYPOINT "):
            stages[current] = (stages[current][0], json.loads(line.removeprefix("ENTRYPOINT ")))
    base, entry = stages[target]
    return entry or (_entrypoint(dockerfile, base) if base in stages else [])


def test_programs_the_member_configs_run_are_in_the_member_image() -> None:
    dockerfile = (COMPOSE / "images" / "hapki" / "Dockerfile").read_text()
    member_stage = dockerfile[dockerfile.index(" AS member"):]
    packages = set(" ".join(re.findall(r"apt-get install -y --no-install-recommends ([^\\\n&]+)", member_stage)).split())
    programs = {Path(p).name for conf in (COMPOSE / "rendered").glob("*/keepalived.conf")
                for p in re.findall(r'(?m)^\s*script "(\S+)', conf.read_text())}
    assert programs, "no track script rendered: the check would prove nothing"
    assert programs <= packages | {"sh"}, f"member image lacks {programs - packages}"
