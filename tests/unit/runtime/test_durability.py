"""hapki.runtime.durability: which node settings lose commits in a power cut of the whole site."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from hapki.contracts.errors import DatabaseError
from hapki.runtime.durability import read_nodes

DURABLE = {"innodb_flush_log_at_trx_commit": "1", "innodb_doublewrite": "ON", "log_bin": "OFF", "sync_binlog": "0"}


class FakeDatabase:
    def __init__(self, nodes: dict[str, dict[str, str] | None]) -> None:
        self._nodes = nodes

    @property
    def nodes(self) -> list[str]:
        return list(self._nodes)

    async def node_variables(self, node: str, names: Sequence[str], timeout: float = 5.0) -> dict[str, str]:
        found = self._nodes[node]
        if found is None:
            raise DatabaseError(f"database node {node} did not answer")
        return {name: found[name] for name in names if name in found}


def read(nodes: dict[str, dict[str, str] | None]):  # type: ignore[no-untyped-def]
    return {n.node: n for n in asyncio.run(read_nodes(FakeDatabase(nodes)))}  # type: ignore[arg-type]


def test_a_node_flushing_once_a_second_is_named_with_the_setting_and_why() -> None:
    found = read({"db-1:3306": DURABLE, "db-2:3306": {**DURABLE, "innodb_flush_log_at_trx_commit": "2"}})
    assert found["db-1:3306"].ok and not found["db-1:3306"].problems
    assert not found["db-2:3306"].ok
    [problem] = found["db-2:3306"].problems
    assert problem.startswith("innodb_flush_log_at_trx_commit = 2 (wanted 1)") and "power cut" in problem


def test_the_binary_log_must_be_synced_only_when_it_is_on() -> None:
    assert read({"a:1": {**DURABLE, "log_bin": "OFF", "sync_binlog": "0"}})["a:1"].ok
    [problem] = read({"a:1": {**DURABLE, "log_bin": "ON", "sync_binlog": "0"}})["a:1"].problems
    assert problem.startswith("sync_binlog = 0 (wanted 1)")
    assert read({"a:1": {**DURABLE, "log_bin": "ON", "sync_binlog": "1"}})["a:1"].ok


def test_a_missing_setting_and_a_torn_page_risk_are_findings() -> None:
    problems = read({"a:1": {"innodb_doublewrite": "OFF", "log_bin": "OFF"}})["a:1"].problems
    assert [p.split(" = ")[0] for p in problems] == ["innodb_flush_log_at_trx_commit", "innodb_doublewrite"]


def test_a_node_that_does_not_answer_is_unknown_not_wrong() -> None:
    found = read({"a:1": DURABLE, "b:1": None})
    assert found["b:1"].error and not found["b:1"].problems and not found["b:1"].ok
    assert found["a:1"].ok
