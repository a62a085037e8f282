"""The committed AsyncAPI document is what the code generates (run `hapki docs asyncapi` after a change)."""

from __future__ import annotations

from hapki.cli.asyncapi import ASYNCAPI_PATH, render
from hapki.contracts import subjects


def test_committed_asyncapi_document_is_current() -> None:
    assert ASYNCAPI_PATH.read_text() == render(), "contracts/asyncapi.yaml is stale: run `hapki docs asyncapi`"


def test_document_covers_every_subject() -> None:
    text = render()
    for name in dir(subjects):
        value = getattr(subjects, name)
        if isinstance(value, str) and value.startswith("pki.v1.") and name != "HA_EVENTS_PREFIX":
            assert f"address: {value}" in text, value
    assert f"address: {subjects.HA_EVENTS_PREFIX}." in text
