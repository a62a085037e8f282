"""The `hapki` command as an operator runs it, and the config file an admin command reads."""

from __future__ import annotations

import subprocess
from pathlib import Path

import tomli_w

from hapki.lab.stack import hapki_command
from hapki.runtime.config import DatabaseConfig


def hapki(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`hapki ARGS...` in a child process; its exit status, stdout and stderr."""
    return subprocess.run([*hapki_command(), *args], capture_output=True, text=True, timeout=timeout, check=False)


def database_config_file(config: DatabaseConfig, path: Path) -> Path:
    """A config file with just a [database] section (what `hapki db ...` reads)."""
    path.write_text(tomli_w.dumps({"database": config.model_dump(mode="json", exclude_none=True)}))
    return path
