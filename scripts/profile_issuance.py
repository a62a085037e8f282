"""Where CLM's and CARA's CPU goes under issuance load: both services on the local stack, loaded by k6/issue.js at
maximum over CLM's REST API; prints each one's CPU by package and its top functions by own time.

    .venv/bin/python scripts/profile_issuance.py [--seconds 15] [--vus 32] [--dir .run/profile] [--sampler py-spy]
    .venv/bin/python scripts/profile_issuance.py --sampler py-spy --lab [LAB_DIR]   # the running HA lab instead

`--sampler cprofile` (the default) runs both services under cProfile with the process's CPU clock; the profiles stay
in DIR/{clm,cara}.prof (`python -m pstats` reads them). cProfile slows Python code down (roughly 1.5-2x) and
charges every Python call its own overhead, so it overstates code made of many small calls (session 16:
OpenTelemetry 10.9% of CLM's time under cProfile, 3.6% sampled; the database driver 18.3% of CARA's, 5.0%
sampled); read shares, not absolute rates. It profiles the event-loop thread only: work handed to a thread (the
HSM signature) is not in it.

`--sampler py-spy` samples the unmodified services (py-spy, the `profile` extra of pyproject.toml) every 5 ms, all
threads and child processes, for the load's middle `--seconds` minus 4; the raw stacks stay in DIR/{clm,cara}.raw.
A sample is charged to its innermost Python frame, so time in C (a signature, a socket write) shows under the
Python function that called it. With `--lab` it samples the running HA lab's CLM and CARA processes (every member;
the passive ones show few samples) while k6 loads the CLM VIP over TLS, as `hapki bench --compare --columns lab`
does.

The services trace as `hapki bench --compare` has them (the production sampler unless OTEL_TRACES_SAMPLER names
one) and run on the event loop `hapki serve` uses (HAPKI_EVENT_LOOP).
"""

from __future__ import annotations

import argparse
import json
import pstats
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from hapki.cli import k6
from hapki.cli.bench_compare import tracing_sampler
from hapki.cli.demo import start_stack
from hapki.lab.local import free_port
from hapki.lab.stack import ServiceProcess


# cProfile with the process's CPU clock, not the wall clock: on a shared 2-core machine a wall-clock profile charges
# a function for the time its process waited for a core (a socket send that wakes the peer looks expensive).
BOOT = """
import cProfile, runpy, sys, time
out, sys.argv = sys.argv[1], ["hapki", *sys.argv[2:]]
profile = cProfile.Profile(time.process_time)
profile.enable()
try:
    runpy.run_module("hapki.cli.main", run_name="__main__")  # `hapki serve`: its event loop (uvloop) included
except SystemExit:
    pass
finally:
    profile.disable()
    profile.dump_stats(out)
"""


class ProfiledService(ServiceProcess):
    """`hapki serve <service>` under cProfile (CPU time): the profile is written to `out` when it stops."""

    def __init__(self, service: str, config_path: Path, log_path: Path, env: dict[str, str], out: Path) -> None:
        super().__init__(service, config_path, log_path, env)
        self.out = out

    def start(self, timeout: float = 60.0, extra_env: dict[str, str] | None = None) -> ProfiledService:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", BOOT, str(self.out), "serve", self.service, "--config", str(self.config_path)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=self._env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"hapki {self.service} ready" in self.log_path.read_text(errors="replace")[offset:]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"profiled {self.service} did not start; see {self.log_path}")


PACKAGES = (("aiomysql", "database driver (aiomysql + PyMySQL)"), ("pymysql", "database driver (aiomysql + PyMySQL)"),
            ("asyncio", "asyncio (event loop, streams, TLS)"), ("ssl.py", "asyncio (event loop, streams, TLS)"),
            ("opentelemetry", "OpenTelemetry"), ("faststream", "FastStream + nats-py"), ("nats", "FastStream + nats-py"),
            ("aiohttp", "aiohttp"), ("pydantic", "pydantic"), ("cryptography", "cryptography"),
            ("pkcs11", "python-pkcs11"), ("/services/", "hapki code"), ("/contracts/", "hapki code"))


def by_package(stats: pstats.Stats) -> dict[str, float]:
    """Own CPU time summed by package (C functions under their own name: socket, SSL, builtins)."""
    totals: dict[str, float] = {}
    for (filename, _line, name), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if filename == "~":
            group = ("cryptography" if "cryptography" in name else "python-pkcs11" if "pkcs11" in name
                     else "C: socket/SSL I/O" if any(k in name for k in ("socket", "SSL", "epoll"))
                     else "startup (imports)" if any(k in name for k in ("marshal", "compile", "_imp", "exec"))
                     else "C: other builtins")
        else:
            group = _group_of(filename)
        totals[group] = totals.get(group, 0.0) + tottime
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _group_of(filename: str) -> str:
    if "importlib" in filename or filename.startswith("<frozen"):
        return "startup (imports)"
    return next((label for key, label in PACKAGES if key in filename), "other Python")


def sampled_shares(raw_lines: Iterable[str]) -> tuple[int, dict[str, int], Counter[str]]:
    """(samples, samples by package, samples by function) of py-spy's raw output (``frame;frame;... count`` per line,
    root first, ``--full-filenames``): each sample goes to its innermost Python frame."""
    total, groups, functions = 0, Counter[str](), Counter[str]()
    for line in raw_lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        name, _, where = leaf.partition(" (")
        filename = where.rsplit(":", 1)[0]
        # py-spy's own pseudo-frames (the process, a thread) have no file: nothing ran below them
        group = _group_of(filename) if where else "other Python"
        total += int(count)
        groups[group] += int(count)
        functions[f"{name} ({_short(filename)})"] += int(count)
    return total, dict(groups.most_common()), functions


# Where a frame's file is cut for display: site-packages first (the venv lives inside the repository), then the
# repository, then the stdlib.
_ROOTS = ("site-packages/", f"{Path(__file__).resolve().parents[1]}/",
          f"python{sys.version_info[0]}.{sys.version_info[1]}/")


def _short(filename: str) -> str:
    """A frame's file as a reader knows it: from the package (site-packages, the stdlib) or the repository root."""
    for root in _ROOTS:
        if root in filename:
            return filename.rsplit(root, 1)[-1]
    return filename


def _sample(targets: dict[str, list[int]], base: Path, args: argparse.Namespace, k6_env: dict[str, str],
            ca_bundle: Path | None = None) -> None:
    """k6 at maximum (or --rate) in a thread; py-spy on every process of `targets` (label -> pids, their children
    included) for the load's middle; then each one's samples by package and its top functions."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy not found: .venv/bin/pip install -e '.[profile]' (scripts/setup.sh does)")
    done: dict[str, k6.K6Summary] = {}
    load = threading.Thread(target=lambda: done.setdefault("summary", k6.run(
        "issue.js", k6_env, base / "summary.json", seconds=args.seconds + 2, log_file=base / "k6.log",
        ca_bundle=ca_bundle)))
    load.start()
    time.sleep(4)  # the warm-up and the first batches
    raws = {f"{label}-{pid}" if len(pids) > 1 else label: pid for label, pids in targets.items() for pid in pids}
    spies = [subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(max(1, int(args.seconds) - 4)),
                               "--rate", "200", "--format", "raw", "--full-filenames", "--nonblocking",
                               "--subprocesses", "--output", str(base / f"{name}.raw")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in raws.items()]
    for spied in spies:
        spied.wait()
    load.join()
    summary = done["summary"]
    print(f"sampled: {summary.rate_per_s:.1f} issued/s, p99 {summary.p99_ms} ms, {summary.errors} errors")
    for name in raws:
        raw = base / f"{name}.raw"
        total, groups, functions = sampled_shares(raw.read_text().splitlines() if raw.exists() else [])
        print(f"\n=== {name}: samples by package (innermost Python frame; {total} samples) ===")
        for group, count in groups.items():
            print(f"  {100 * count / max(total, 1):5.1f}%  {group}")
        print(f"=== {name}: top {args.top} functions by own samples ===")
        for function, count in functions.most_common(args.top):
            print(f"  {100 * count / max(total, 1):5.1f}%  {function}")


def _sample_lab(lab_dir: Path, base: Path, args: argparse.Namespace, csrs: Path) -> None:
    """py-spy on the HA lab's CLM and CARA processes (both members of each; the passive ones show few samples),
    loaded through the CLM VIP over TLS as `hapki bench --compare --columns lab` loads it."""
    from hapki.cli.bench_compare import REQUESTER
    from hapki.lab.ha import Lab

    lab = Lab(lab_dir)
    if lab.procs.meta.get("state") != "up" or not lab.reachable():
        raise SystemExit(f"the HA lab in {lab.base_dir} is not up (`hapki lab up --dir {lab_dir}`)")
    targets = {name: lab.procs.pids(name) for kind in ("clm", "cara") for name in lab.procs.names(kind=kind)}
    k6_env = {**_k6_env(args, "", csrs), "TARGET": "hapki", "BASE_URL": lab.url("clm"), "REQUESTER": REQUESTER,
              "RUN_ID": f"profile-{secrets.token_hex(4)}"}  # the lab keeps its requests: fresh idempotency keys
    _sample({name: [pid for pid in pids if pid] for name, pids in targets.items()}, base, args, k6_env,
            ca_bundle=lab.ca_bundle)


def _k6_env(args: argparse.Namespace, listen: str, csrs: Path) -> dict[str, str]:
    return {"BASE_URL": f"http://{listen}", "CSR_FILE": str(csrs), "MODE": "rate" if args.rate else "max",
            "RATE": f"{args.rate:g}", "VUS": str(args.vus), "SECONDS": f"{args.seconds:g}", "WARMUP": "2"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--vus", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="a constant arrival rate (issuances/s) instead of --vus closed-loop clients at maximum")
    parser.add_argument("--dir", type=Path, default=Path(".run/profile"))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sampler", choices=("cprofile", "py-spy"), default="cprofile")
    parser.add_argument("--lab", type=Path, nargs="?", const=Path(".run/lab"), default=None, metavar="LAB_DIR",
                        help="sample the running HA lab's services (py-spy) instead of a local stack")
    args = parser.parse_args()
    if args.lab is not None and args.sampler != "py-spy":
        raise SystemExit("--lab samples the lab's running services: it needs --sampler py-spy")
    base = args.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    csrs = base / "csrs.json"
    csrs.write_text(json.dumps(k6.make_csrs(256)))
    if args.lab is not None:
        _sample_lab(args.lab, base, args, csrs)
        return 0
    listen = f"127.0.0.1:{free_port()}"
    sampler, source = tracing_sampler()
    print(f"trace sampler: {sampler.describe()} ({source})")
    stack = start_stack(base, None, clm_overrides={"http_listen": listen}, env_overrides=sampler.env())
    if args.sampler == "py-spy":
        try:
            _sample({name: [getattr(stack, name).pid] for name in ("clm", "cara")}, base, args,
                    _k6_env(args, listen, csrs))
        finally:
            stack.stop()
        return 0
    profiled: list[ProfiledService] = []
    try:
        for name in ("cara", "clm"):  # replace the plain services with profiled ones on the same configs
            plain = getattr(stack, name)
            plain.stop()
            service = ProfiledService(name, plain.config_path, plain.log_path, stack.child_env(), base / f"{name}.prof")
            profiled.append(service.start())
        summary = k6.run("issue.js", _k6_env(args, listen, csrs), base / "summary.json", seconds=args.seconds + 2,
                         log_file=base / "k6.log")
        print(f"under cProfile: {summary.rate_per_s:.1f} issued/s, p99 {summary.p99_ms} ms, {summary.errors} errors")
    finally:
        for service in profiled:
            service.stop(timeout=30)
        stack.stop()
    for service in profiled:
        print(f"\n=== {service.service}: top {args.top} functions by own time ===")
        stats = pstats.Stats(str(service.out))
        stats.sort_stats("tottime").print_stats(args.top)
        totals = by_package(stats)
        everything = sum(totals.values())
        print(f"=== {service.service}: own CPU time by package ({everything:.1f} s in all) ===")
        for group, seconds in totals.items():
            print(f"  {100 * seconds / everything:5.1f}%  {seconds:6.2f} s  {group}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
