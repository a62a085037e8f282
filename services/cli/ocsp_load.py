"""A closed-loop OCSP load generator: HTTP/1.1 over TLS, keep-alive, one connection per client.

Why not aiohttp: at thousands of responses a second a Python client, not the responder, is the limit (aiohttp
with asyncio's TLS managed ~1,500/s on one core here). Each client here is a thread with a blocking TLS socket
(the TLS work runs in OpenSSL without the GIL) that sends a prepared request and reads the response by its
Content-Length; clients are spread over a few processes. Every response is checked: a successful OCSP response,
status `good`, for the serial asked (parsed once per distinct body, then looked up).

Where each answer came from (`sources`): `haproxy` (haproxy's cache: it adds an Age header), else CARA's
X-Hapki-Ocsp-Source header: `cache` (CARA's memory), `produced` (read and signed now), `nonce`, `error`.
"""

from __future__ import annotations

import multiprocessing
import queue
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.x509 import ocsp

CLIENTS_PER_PROCESS = 32  # more threads per process only wait for the GIL
CONNECT_TIMEOUT_SECONDS = 5.0
ERROR_SAMPLES = 3


@dataclass(frozen=True)
class Probe:
    """One prepared request: the bytes to send and the serial the answer must be about."""

    raw: bytes
    serial: int
    method: str  # GET or POST


def get_probe(host: str, der_request: bytes, serial: int) -> Probe:
    """GET /ocsp/<base64 of the DER request> (RFC 6960 A.1; '+', '/', '=' percent-encoded, RFC 5019 5)."""
    import base64
    import urllib.parse

    path = "/ocsp/" + urllib.parse.quote(base64.b64encode(der_request).decode(), safe="")
    return Probe(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), serial, "GET")


def post_probe(host: str, der_request: bytes, serial: int) -> Probe:
    head = (f"POST /ocsp HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/ocsp-request\r\n"
            f"Content-Length: {len(der_request)}\r\n\r\n").encode()
    return Probe(head + der_request, serial, "POST")


@dataclass(frozen=True)
class Target:
    """Where the clients connect: address, port, the name TLS checks, and the CA file that certifies it."""

    address: str
    port: int
    server_hostname: str
    cafile: Path


class _Verdicts:
    """Body -> (problem or None, serial): a response is parsed once however often it is served."""

    def __init__(self) -> None:
        self._seen: dict[bytes, tuple[str | None, int | None]] = {}

    def check(self, body: bytes, serial: int) -> str | None:
        verdict = self._seen.get(body)
        if verdict is None:
            try:
                answer = ocsp.load_der_ocsp_response(body)
                if answer.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
                    verdict = (answer.response_status.name, None)
                elif answer.certificate_status is not ocsp.OCSPCertStatus.GOOD:
                    verdict = (answer.certificate_status.name, answer.serial_number)
                else:
                    verdict = (None, answer.serial_number)
            except ValueError as exc:
                verdict = (f"unparseable response: {exc}"[:120], None)
            if len(self._seen) < 100_000:
                self._seen[body] = verdict
        problem, answered = verdict
        if problem is None and answered != serial:
            return f"answer about serial {answered:x}, asked {serial:x}"
        return problem


def _read_response(sock: ssl.SSLSocket, buffer: bytearray) -> tuple[bytes, dict[bytes, bytes]]:
    """One HTTP/1.1 response with a Content-Length (what haproxy and aiohttp send here): (body, headers)."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        buffer += chunk
    lines = bytes(buffer[:end]).split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"HTTP status {lines[0][:40]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0"))
    while len(buffer) < end + 4 + length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed in a response body")
        buffer += chunk
    body = bytes(buffer[end + 4:end + 4 + length])
    del buffer[:end + 4 + length]
    return body, headers


class _Tally:
    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self.sources: Counter[str] = Counter()
        self.methods: Counter[str] = Counter()
        self.connections = 0
        self.warmup_errors = 0  # not counted as errors; reconnected (a connection the server closed, e.g.)
        self.lock = threading.Lock()

    def error(self, problem: str) -> None:
        with self.lock:
            self.errors += 1
            if len(self.error_samples) < ERROR_SAMPLES:
                self.error_samples.append(problem[:200])


def _client(target: Target, probes: list[Probe], offset: int, window: tuple[float, float], tally: _Tally,
            verdicts: _Verdicts, context: ssl.SSLContext, interval: float | None) -> None:
    sock: ssl.SSLSocket | None = None
    buffer = bytearray()
    i = offset
    due = time.monotonic() + (interval or 0.0) * offset / max(1, len(probes))  # paced clients start staggered
    while (start := time.monotonic()) < window[1]:
        if interval is not None:
            # Paced: send at the scheduled time and measure from it, so that a response that came late also
            # delays (and counts against) the requests scheduled behind it (no coordinated omission).
            if due > start:
                time.sleep(due - start)
            start, due = due, due + interval
        probe = probes[i % len(probes)]
        i += 1
        try:
            if sock is None:
                raw = socket.create_connection((target.address, target.port), timeout=CONNECT_TIMEOUT_SECONDS)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = context.wrap_socket(raw, server_hostname=target.server_hostname)
                buffer.clear()
                with tally.lock:
                    tally.connections += 1
            sock.sendall(probe.raw)
            body, headers = _read_response(sock, buffer)
            problem = verdicts.check(body, probe.serial)
        except (OSError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            if sock is not None:
                sock.close()
            sock = None
            headers = {}
        if start < window[0]:
            if problem is not None:
                with tally.lock:
                    tally.warmup_errors += 1
            continue
        if problem is not None:
            tally.error(problem)
            continue
        source = "haproxy" if b"age" in headers else headers.get(b"x-hapki-ocsp-source", b"none").decode()
        elapsed_ms = (time.monotonic() - start) * 1000
        with tally.lock:
            tally.latencies_ms.append(elapsed_ms)
            tally.sources[source] += 1
            tally.methods[probe.method] += 1
    if sock is not None:
        sock.close()


def _process(target: Target, probes: list[Probe], offsets: list[int], window: tuple[float, float],
             interval: float | None, out: Any) -> None:
    """One load process: a thread per client; puts its tally on `out`."""
    context = ssl.create_default_context(cafile=str(target.cafile))
    tally, verdicts = _Tally(), _Verdicts()
    threads = [threading.Thread(target=_client, args=(target, probes, o, window, tally, verdicts, context, interval),
                                daemon=True) for o in offsets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put({"latencies_ms": tally.latencies_ms, "errors": tally.errors, "error_samples": tally.error_samples,
             "sources": dict(tally.sources), "methods": dict(tally.methods), "connections": tally.connections,
             "warmup_errors": tally.warmup_errors})


def run(target: Target, probes: list[Probe], concurrency: int, seconds: float, warmup: float,
        rate: float | None = None) -> dict[str, Any]:
    """`concurrency` clients for warmup + seconds; figures of the measured `seconds` (merged). Closed loop (each
    client sends its next request when the answer is in), or with `rate` paced to that many requests a second in
    all (each client at rate/concurrency; latency from the scheduled send time)."""
    interval = None if rate is None else concurrency / rate
    processes = max(1, min(-(-concurrency // CLIENTS_PER_PROCESS), multiprocessing.cpu_count()))
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    began = time.monotonic() + 1.0  # time for the processes to start before the warm-up counts
    window = (began + warmup, began + warmup + seconds)
    offsets = [list(range(p, concurrency, processes)) for p in range(processes)]
    workers = [context.Process(target=_process, args=(target, probes, o, window, interval, out), daemon=True)
               for o in offsets]
    for w in workers:
        w.start()
    parts: list[dict[str, Any]] = []
    deadline = window[1] + 60
    while len(parts) < len(workers):
        try:
            parts.append(out.get(timeout=1.0))
        except queue.Empty:
            if time.monotonic() > deadline or not any(w.is_alive() for w in workers):
                raise RuntimeError(f"{len(workers) - len(parts)} of {len(workers)} OCSP load processes gave no "
                                   "figures (died, or hung)") from None
    for w in workers:
        w.join(timeout=10)
    merged: dict[str, Any] = {"latencies_ms": [], "errors": 0, "error_samples": [], "sources": Counter(),
                              "methods": Counter(), "connections": 0, "warmup_errors": 0, "processes": processes}
    for part in parts:
        merged["latencies_ms"] += part["latencies_ms"]
        merged["errors"] += part["errors"]
        merged["error_samples"] += part["error_samples"][:ERROR_SAMPLES - len(merged["error_samples"])]
        merged["sources"].update(part["sources"])
        merged["methods"].update(part["methods"])
        merged["connections"] += part["connections"]
        merged["warmup_errors"] += part["warmup_errors"]
    merged["sources"], merged["methods"] = dict(merged["sources"]), dict(merged["methods"])
    return merged
