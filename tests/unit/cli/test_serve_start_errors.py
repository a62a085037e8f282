"""`hapki serve` with a config or an environment it cannot use: one line naming the problem, exit 2, nothing
started; supervised too (checked before the first fork, not a crash loop of tracebacks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hapki.cli.main import main

CONFIG = Path(__file__).resolve().parents[3] / "compose" / "config"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "HAPKI_TRACE_FILE", "HAPKI_TRACE_FILE_MAX_MB",
                 "HAPKI_TRACE_FILE_BACKUPS", "HAPKI_SIGNER_PROCESSES"):
        monkeypatch.delenv(name, raising=False)


def serve(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["serve", *args])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("supervise", [[], ["--supervise"]])
def test_a_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], supervise: list[str]) -> None:
    code, err = serve(capsys, "cara", *supervise, "--config", str(tmp_path / "absent.toml"))
    assert code == 2
    assert err.strip() == f"hapki serve cara: {tmp_path / 'absent.toml'}: No such file or directory"


def test_a_file_that_is_not_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "clm.toml").write_text("[nats\n")
    code, err = serve(capsys, "clm", "--config", str(tmp_path / "clm.toml"))
    assert code == 2
    assert "clm.toml: not TOML" in err and "Traceback" not in err


@pytest.mark.parametrize("supervise", [[], ["--supervise"]])
def test_every_wrong_field_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], supervise: list[str]) -> None:
    text = (CONFIG / "clm.toml").read_text().replace('member = "clm-1"', "member = 7") + "\nsurprise = 1\n"
    (tmp_path / "clm.toml").write_text(text)
    code, err = serve(capsys, "clm", *supervise, "--config", str(tmp_path / "clm.toml"))
    assert code == 2
    assert "member: Input should be a valid string" in err
    assert "surprise: Extra inputs are not permitted" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("env", "named"), [
    ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER='sometimes'"),
    ({"HAPKI_TRACE_FILE": "/tmp/spans.jsonl", "HAPKI_TRACE_FILE_MAX_MB": "-3"}, "HAPKI_TRACE_FILE_MAX_MB='-3'"),
    ({"HAPKI_SIGNER_PROCESSES": "40"}, "signer.processes"),
])
@pytest.mark.parametrize("supervise", [[], ["--supervise"]])
def test_a_bad_environment_is_named(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                    env: dict[str, str], named: str, supervise: list[str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, err = serve(capsys, "cara", *supervise, "--config", str(CONFIG / "cara.toml"))
    assert code == 2
    assert err.startswith("hapki serve cara: ") and named in err


def test_other_commands_name_a_bad_config_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["db", "migrate", "--config", str(tmp_path / "absent.toml")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"hapki db: {tmp_path / 'absent.toml'}: No such file or directory"
