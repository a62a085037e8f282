"""Property tests of the three parsers of untrusted bytes (the same targets `hapki fuzz` runs a million times).

Whatever the bytes, each target returns or raises only the project's typed errors (which it swallows), within a
time bound per input. Short here (CI); the long runs and their figures are in docs/SECURITY.md, "Fuzzing".
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hapki.cli import fuzz
from hapki.cli.fuzz_targets import CONTRACT_MODELS, TARGETS, seeds
from hapki.cli.main import main as hapki_main

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Generous for CI machines; a pathological input (quadratic parsing, a huge RSA exponent) takes seconds.
SECONDS_PER_INPUT = 0.5


def timed(target: str, data: bytes) -> None:
    started = time.monotonic()
    TARGETS[target](data)
    assert time.monotonic() - started < SECONDS_PER_INPUT


@st.composite
def mutated(draw: st.DrawFn, target: str) -> bytes:
    """A seed of `target` with a few byte-level edits: most inputs get past the first parsing step."""
    data = bytearray(draw(st.sampled_from(seeds(target))))
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if kind == "insert" or not data or position == len(data):
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[position] = draw(st.integers(0, 255))
        else:
            del data[position:position + draw(st.integers(1, 16))]
    return bytes(data)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_are_accepted_quickly(target: str) -> None:
    for data in seeds(target):
        timed(target, data)


@PROPERTY
@given(st.sampled_from(sorted(TARGETS)), st.binary(max_size=4096))
def test_arbitrary_bytes(target: str, data: bytes) -> None:
    timed(target, data)


@PROPERTY
@given(st.data())
def test_mutated_csrs(data: st.DataObject) -> None:
    timed("csr", data.draw(mutated("csr")))


@PROPERTY
@given(st.data())
def test_mutated_contract_messages(data: st.DataObject) -> None:
    timed("contracts", data.draw(mutated("contracts")))


@PROPERTY
@given(st.data())
def test_mutated_ocsp_requests(data: st.DataObject) -> None:
    timed("ocsp", data.draw(mutated("ocsp")))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=4), max_leaves=30)


@PROPERTY
@given(st.integers(0, 255), JSON)
def test_every_contract_model_decodes_arbitrary_json(model: int, value: object) -> None:
    timed("contracts", bytes([model]) + json.dumps(value).encode())


def test_deeply_nested_json_is_refused_not_a_recursion_error() -> None:
    for model in range(len(CONTRACT_MODELS)):
        timed("contracts", bytes([model]) + b'{"details": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        timed("contracts", bytes([model]) + b'{"error": {"details": {"a": ' + b'{"a": ' * 5000 + b"1" +
              b"}" * 5003)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_the_random_engine_runs_a_bounded_number_of_inputs(target: str, tmp_path: object) -> None:
    result = fuzz.run(target, runs=500, seconds=30, engine="random", out_dir=tmp_path, seed=1)  # type: ignore[arg-type]
    assert result.inputs == 500 and result.crashes == 0 and result.peak_rss_mb > 0


def test_hapki_fuzz_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert hapki_main(["fuzz", "--target", "ocsp", "--runs", "200", "--seconds", "10", "--engine", "random",
                       "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["target"] == "ocsp" and result["inputs"] == 200 and result["crashes"] == 0


def test_atheris_engine_when_installed(tmp_path: object) -> None:
    pytest.importorskip("atheris")
    result = fuzz.run("contracts", runs=2000, seconds=30, engine="atheris", out_dir=tmp_path)  # type: ignore[arg-type]
    assert result.inputs == 2000 and result.crashes == 0


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_in_free_form_fields_are_refused(number: str) -> None:
    """The contracts fuzz target's round-trip check: pydantic read them into `details`/`health`, wrote them as null."""
    from pydantic import ValidationError

    from hapki.contracts.models import ErrorBody, HAEvent

    with pytest.raises(ValidationError):
        ErrorBody.model_validate_json(f'{{"code": "INTERNAL", "message": "x", "details": {{"a": [{number}]}}}}')
    with pytest.raises(ValidationError):
        HAEvent.model_validate_json(
            f'{{"tier": "cara", "member": "m", "vip": "v", "role": "active", "holds_vip": true, "reason": "r", '
            f'"observed_at": "2026-01-01T00:00:00Z", "health": {{"x": {{"y": {number}}}}}}}')
