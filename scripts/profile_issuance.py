"""Where CLM's and CARA's CPU goes under issuance load: both services under cProfile on the local stack, loaded
by k6/issue.js at maximum over CLM's REST API; prints the top functions of each by own time (tottime).

    .venv/bin/python scripts/profile_issuance.py [--seconds 15] [--vus 32] [--dir .run/profile]

The profiles stay in DIR/{clm,cara}.prof (`python -m pstats` reads them); times are CPU seconds of the process.
cProfile itself slows Python code down (roughly 1.5-2x), so read shares, not absolute rates. It profiles the
event-loop thread only: work handed to a thread (the HSM signature) is not in it. The services trace as `hapki
bench --compare` has them (the production sampler unless OTEL_TRACES_SAMPLER names one) and run on the event loop
`hapki serve` uses (HAPKI_EVENT_LOOP).
"""

from __future__ import annotations

import argparse
import json
import pstats
import subprocess
import sys
import time
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
        elif "importlib" in filename or filename.startswith("<frozen"):
            group = "startup (imports)"
        else:
            group = next((label for key, label in PACKAGES if key in filename), "other Python")
        totals[group] = totals.get(group, 0.0) + tottime
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--vus", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="a constant arrival rate (issuances/s) instead of --vus closed-loop clients at maximum")
    parser.add_argument("--dir", type=Path, default=Path(".run/profile"))
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    base = args.dir.resolve()
    listen = f"127.0.0.1:{free_port()}"
    sampler, source = tracing_sampler()
    print(f"trace sampler: {sampler.describe()} ({source})")
    stack = start_stack(base, None, clm_overrides={"http_listen": listen}, env_overrides=sampler.env())
    profiled: list[ProfiledService] = []
    try:
        for name in ("cara", "clm"):  # replace the plain services with profiled ones on the same configs
            plain = getattr(stack, name)
            plain.stop()
            service = ProfiledService(name, plain.config_path, plain.log_path, stack.child_env(), base / f"{name}.prof")
            profiled.append(service.start())
        csrs = base / "csrs.json"
        csrs.write_text(json.dumps(k6.make_csrs(256)))
        summary = k6.run("issue.js", {"BASE_URL": f"http://{listen}", "CSR_FILE": str(csrs), "MODE": "rate" if args.rate else "max",
                                      "RATE": f"{args.rate:g}", "VUS": str(args.vus), "SECONDS": f"{args.seconds:g}", "WARMUP": "2"},
                         base / "summary.json", seconds=args.seconds + 2, log_file=base / "k6.log")
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
