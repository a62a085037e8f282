"""`hapki fuzz`: run one parser's fuzz target for N inputs, bounded in time; print inputs/s, crashes, peak RSS.

Two engines:
- atheris (libFuzzer, coverage-guided over hapki's Python code; `pip install -e .[fuzz]`): runs in a child
  process (libFuzzer exits the process when done) with a per-input timeout (a hang is a finding) and an RSS
  limit (unbounded memory is a finding); the figures come from libFuzzer's final statistics.
- random: a built-in mutator over the same seeds (byte flips, overwrites, insertions, deletions, duplications,
  splices), in process, with an alarm per input; for hosts without atheris.

The module imports no hapki code at the top: the atheris child must import the targets under instrumentation.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

TARGET_NAMES = ("csr", "contracts", "ocsp")
# Per-input limits: a single input taking longer is a hang; a process growing past the RSS limit is a leak.
INPUT_TIMEOUT_SECONDS = 10
RSS_LIMIT_MB = 2048


@dataclass
class FuzzResult:
    """What one run did."""

    target: str
    engine: str
    inputs: int
    seconds: float
    inputs_per_second: float
    crashes: int
    peak_rss_mb: float
    findings: list[str]  # files holding the crashing inputs (empty when crashes == 0)

    def line(self) -> str:
        return (f"fuzz {self.target} ({self.engine}): {self.inputs:,} inputs in {self.seconds:.1f} s = "
                f"{self.inputs_per_second:,.0f}/s; crashes {self.crashes}; peak RSS {self.peak_rss_mb:.0f} MiB")


def run(target: str, *, runs: int, seconds: float, engine: str = "auto", out_dir: Path | None = None,
        seed: int | None = None) -> FuzzResult:
    """Fuzz `target` for `runs` inputs or `seconds`, whichever ends first."""
    if target not in TARGET_NAMES:
        raise ValueError(f"unknown fuzz target {target!r}; one of {', '.join(TARGET_NAMES)}")
    if engine == "auto":
        engine = "atheris" if _has_atheris() else "random"
    out = Path(out_dir or tempfile.mkdtemp(prefix=f"hapki-fuzz-{target}-"))
    out.mkdir(parents=True, exist_ok=True)
    if engine == "atheris":
        return _run_atheris(target, runs=runs, seconds=seconds, out=out)
    return _run_random(target, runs=runs, seconds=seconds, out=out, seed=seed)


def _has_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


# --- atheris ---------------------------------------------------------------------------------------------------


def _run_atheris(target: str, *, runs: int, seconds: float, out: Path) -> FuzzResult:
    corpus = out / "corpus"
    corpus.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "hapki.cli.fuzz", "--atheris-child", target, str(corpus),
            f"-runs={runs}", f"-max_total_time={max(1, int(seconds))}", f"-timeout={INPUT_TIMEOUT_SECONDS}",
            f"-rss_limit_mb={RSS_LIMIT_MB}", f"-artifact_prefix={out}/", "-print_final_stats=1",
            "-max_len=8192", "-close_fd_mask=1", "-keep_seed=1"]
    started = time.monotonic()
    with (out / "libfuzzer.log").open("w") as log_file:
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=log_file, check=False)
    elapsed = time.monotonic() - started
    text = (out / "libfuzzer.log").read_text(errors="replace")
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", text))
    inputs = int(stats.get("number_of_executed_units", 0))
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    findings = sorted(str(p) for p in out.glob("crash-*")) + sorted(str(p) for p in out.glob("timeout-*")) + \
        sorted(str(p) for p in out.glob("oom-*")) + sorted(str(p) for p in out.glob("leak-*"))
    crashes = len(findings) or (0 if proc.returncode == 0 else 1)
    return FuzzResult(target, "atheris", inputs, round(elapsed, 1), inputs / elapsed if elapsed else 0.0, crashes,
                      float(stats.get("peak_rss_mb", child_rss)), findings or ([] if proc.returncode == 0 else
                                                                              [str(out / "libfuzzer.log")]))


def _atheris_child(target: str, argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["hapki"]):
        from hapki.cli import fuzz_targets
    corpus = Path(argv[0])
    for index, data in enumerate(fuzz_targets.seeds(target)):
        (corpus / f"seed-{index}").write_bytes(data)
    one_input = fuzz_targets.TARGETS[target]
    atheris.Setup([sys.argv[0], *argv], one_input)
    atheris.Fuzz()


# --- built-in random mutator -----------------------------------------------------------------------------------


class _Hang(Exception):
    pass


def _mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(7)
        position = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(position, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[min(position, len(out) - 1)] = rng.choice((0x00, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            out[position:position] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and out:
            del out[position:position + rng.randint(1, 32)]
        elif op == 4 and out:
            start = rng.randrange(len(out))
            out[position:position] = out[start:start + rng.randint(1, 64)]
        elif op == 5:
            other = rng.choice(pool)
            start = rng.randrange(len(other) + 1)
            out[position:] = other[start:start + rng.randint(1, 256)] + out[position:]
        else:
            out[position:position] = rng.choice((b"\x00", b"\xff" * 4, b"\x30\x82\xff\xff", b"\n", b'"', b"{}",
                                                 b"[", b"\\u202e", b"\x80"))
    return bytes(out[:8192])


def _run_random(target: str, *, runs: int, seconds: float, out: Path, seed: int | None) -> FuzzResult:
    from hapki.cli import fuzz_targets

    one_input = fuzz_targets.TARGETS[target]
    pool = fuzz_targets.seeds(target)
    rng = random.Random(seed)

    def on_alarm(signum: int, frame: object) -> None:
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    findings: list[str] = []
    crashes = inputs = 0
    started = time.monotonic()
    deadline = started + seconds
    try:
        while inputs < runs and (inputs % 256 or time.monotonic() < deadline):
            data = _mutate(rng, rng.choice(pool), pool)
            inputs += 1
            signal.alarm(INPUT_TIMEOUT_SECONDS)
            try:
                one_input(data)
            except _Hang:
                crashes += 1
                findings.append(_save(out, "timeout", data, "no answer within the per-input timeout"))
            except Exception:  # the finding: anything but the project's typed errors
                crashes += 1
                findings.append(_save(out, "crash", data, traceback.format_exc()))
            finally:
                signal.alarm(0)
            if len(findings) >= 20:
                break
    finally:
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return FuzzResult(target, "random", inputs, round(elapsed, 1), inputs / elapsed if elapsed else 0.0, crashes,
                      peak, findings)


def _save(out: Path, kind: str, data: bytes, why: str) -> str:
    path = out / f"{kind}-{len(list(out.glob(kind + '-*.txt')))}"
    path.write_bytes(data)
    path.with_name(path.name + ".txt").write_text(why)
    return str(path)


def main(args: object) -> int:
    """`hapki fuzz`: exit 0 when every target ran with no crash, 1 otherwise (findings kept, paths printed)."""
    target_arg, runs, seconds = getattr(args, "target"), getattr(args, "runs"), getattr(args, "seconds")
    engine, out_arg, as_json = getattr(args, "engine"), getattr(args, "out"), getattr(args, "json")
    results = []
    for target in TARGET_NAMES if target_arg == "all" else (target_arg,):
        out = Path(out_arg) / target if out_arg else Path(tempfile.mkdtemp(prefix=f"hapki-fuzz-{target}-"))
        result = run(target, runs=runs, seconds=seconds, engine=engine, out_dir=out)
        results.append(result)
        if not as_json:
            print(result.line(), flush=True)
            for finding in result.findings:
                print(f"  finding: {finding}")
        if not out_arg and result.crashes == 0:
            shutil.rmtree(out, ignore_errors=True)  # nothing worth keeping: the corpus grows to thousands of files
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if all(r.crashes == 0 for r in results) else 1


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--atheris-child":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    _atheris_child(sys.argv[2], sys.argv[3:])
