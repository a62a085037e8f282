"""`hapki demo`: the whole system on this machine, one certificate issued through it, verified, and its trace shown.

Step 1: start NATS, MariaDB and SoftHSM (hapki.lab.local), initialise the CA, start CARA and CLM (hapki.lab.stack),
        all writing their spans to one JSON-lines trace file.
Step 2: make a P-256 key and a CSR, and ask CLM for a certificate inside one root span (`demo.issue`).
Step 3: write the files under `out/`, print the certificate and its chain.
Step 4: check them with `openssl verify -x509_strict` against the root that `hapki ca init` wrote.
Step 5: wait for the services to export their spans and print the trace of this issuance as a tree.
Then stop everything (with --keep: after Ctrl-C).

`start_stack` is shared with `hapki bench`: it also cleans up after a killed earlier run in the same directory.
"""

from __future__ import annotations

import asyncio
from typing import Any
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from hapki.contracts.models import IssueReply
from hapki.lab.stack import LocalStack
from hapki.lab.traces import STAGES, issuance_stages, load_spans, trace_tree
from hapki.runtime.telemetry import remove_span_files

DEMO_NAMES = ["demo.example.com", "192.0.2.1"]
TRACE_WAIT_SECONDS = 5.0
# The services export spans in batches every OTEL_BSP_SCHEDULE_DELAY ms (SDK default 5000); the demo asks for
# shorter batches so its trace shows up at once. An explicit setting in the environment wins.
DEMO_EXPORT_DELAY_MS = "200"


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


# --- shared with `hapki bench` ---------------------------------------------------------------------------------


def reap_leftover_services(base_dir: Path, *, everything: bool = False) -> list[int]:
    """Stop `hapki serve` processes that a killed earlier run left behind in `base_dir`; return their PIDs.

    They are found by the config path on their command line, so nothing that belongs to another directory (or
    a reused PID) is touched. LocalEnv does the same for its NATS and MariaDB processes. `everything`: also those
    (any process whose command line names a path inside `base_dir`), before the directory is wiped.
    """
    configs = {str(base_dir / "config" / f"{name}.toml") for name in ("cara", "clm")}
    inside = str(base_dir.resolve()) + os.sep
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if ("serve" in argv and configs.intersection(argv)) or (everything and any(inside in arg for arg in argv)):
            found.append(int(entry.name))
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while found and time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in found):
        time.sleep(0.05)
    return found


def start_stack(base_dir: Path, trace_file: Path | None, **overrides: Any) -> LocalStack:
    """A started LocalStack in `base_dir` whose services write spans to `trace_file` (emptied first; None: no
    spans), with LocalStack's `overrides` (`clm_overrides`, `cara_overrides`, `env_overrides`).

    Reuses the directory's state (database, tokens, CA) as LocalEnv allows; a Ctrl-C during the start leaves no
    process behind.
    """
    base_dir.mkdir(parents=True, exist_ok=True)
    leftovers = reap_leftover_services(base_dir)
    if leftovers:
        print(f"  (stopped services left over from an earlier run: pids {leftovers})", file=sys.stderr)
    if trace_file is not None:
        remove_span_files(trace_file)  # and the files an earlier run's rotated into
        trace_file.touch()
    stack = LocalStack(base_dir, trace_file=trace_file, **overrides)
    try:
        return stack.start()
    except BaseException:
        stack.stop()
        raise


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while inside, so the `finally` blocks that stop the children run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def setup_tracing(service_name: str, trace_file: Path) -> None:
    """This process's spans go to the same file as the services' (a provider installed before wins)."""
    from hapki.runtime import telemetry

    os.environ["HAPKI_TRACE_FILE"] = str(trace_file)
    telemetry.setup(service_name)


# --- the demo ----------------------------------------------------------------------------------------------------


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _issue(nats: Any, csr_pem: bytes) -> tuple[IssueReply, str, float]:
    """Ask CLM for a certificate inside a `demo.issue` root span; (reply, trace id, seconds)."""
    from opentelemetry import trace

    from hapki.cli.client import ClmClient
    from hapki.contracts.models import IssueCertificate

    client = await ClmClient.connect(nats, timeout=20.0)
    try:
        request = IssueCertificate(csr_pem=csr_pem.decode(), profile="tls-server", requester="hapki-demo")
        with trace.get_tracer("hapki.demo").start_as_current_span("demo.issue") as span:
            began = time.perf_counter()
            reply = await client.issue(request)
            took = time.perf_counter() - began
            trace_id = format(span.get_span_context().trace_id, "032x")
    finally:
        await client.close()
    return reply, trace_id, took


def _write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(data)


def _names(cert: x509.Certificate) -> str:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "(none)"
    return ", ".join(
        [f"DNS:{n}" for n in sans.get_values_for_type(x509.DNSName)]
        + [f"IP:{n}" for n in sans.get_values_for_type(x509.IPAddress)]
        + [f"email:{n}" for n in sans.get_values_for_type(x509.RFC822Name)]
    )


def _usage(cert: x509.Certificate) -> str:
    parts = []
    with contextlib.suppress(x509.ExtensionNotFound):
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        parts += [n for n in ("digital_signature", "key_encipherment", "key_cert_sign", "crl_sign")
                  if getattr(ku, n)]
    with contextlib.suppress(x509.ExtensionNotFound):
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        known = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}
        parts += [known.get(oid, oid.dotted_string) for oid in eku]
    return ", ".join(parts) or "(none)"


def _key(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__


def _print_certificate(cert: x509.Certificate, pem: str) -> None:
    rows = [
        ("subject", cert.subject.rfc4514_string()),
        ("names", _names(cert)),
        ("serial", format(cert.serial_number, "x")),
        ("valid", f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} .. {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"),
        ("key", _key(cert)),
        ("usage", _usage(cert)),
        ("issuer", cert.issuer.rfc4514_string()),
    ]
    for label, value in rows:
        _say(f"  {label:<8} {value}")
    _say(pem.rstrip())


def _wait_for_trace(trace_file: Path, trace_id: str, timeout: float) -> list[dict]:
    """Spans of `trace_id`, once CLM's and CARA's (clm.issue, cara.sign, hsm.sign) are in the file or at timeout."""
    wanted = {"clm.issue", "cara.sign", "hsm.sign"}
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for s in load_spans(trace_file) if s.get("trace_id") == trace_id]
        if wanted <= {s["name"] for s in spans}:
            time.sleep(0.3)  # the processes export in batches: let the last stragglers of this trace land
            return [s for s in load_spans(trace_file) if s.get("trace_id") == trace_id]
        if time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


def _verify(base_dir: Path, out: Path, chain: list[x509.Certificate], anchor: Path) -> tuple[bool, str, str]:
    """openssl verify -x509_strict of out/cert.pem against `anchor`, the chain's CA certificates as intermediates.

    Runs in `base_dir` with relative paths, so the command and its output read well when printed.
    """
    from cryptography.hazmat.primitives.serialization import Encoding

    untrusted = out / "intermediates.pem"
    untrusted.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in chain if c.issuer != c.subject))
    argv = ["openssl", "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", str(anchor.relative_to(base_dir)),
            "-untrusted", str(untrusted.relative_to(base_dir)), str((out / "cert.pem").relative_to(base_dir))]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=base_dir)
    return result.returncode == 0, " ".join(argv), (result.stdout + result.stderr).strip()


def _demo(base_dir: Path, keep: bool) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding

    from hapki.cli.client import new_key_and_csr
    from hapki.runtime import telemetry

    trace_file = base_dir / "traces.jsonl"
    out = base_dir / "out"
    _say(f"hapki demo: one certificate, issued end to end on this machine (working directory {base_dir})")
    _say()
    _say("[1/5] Starting NATS (JetStream), MariaDB and SoftHSM, then CARA (the CA) and CLM (the RA) ...")
    os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", DEMO_EXPORT_DELAY_MS)
    began = time.monotonic()
    try:
        stack = start_stack(base_dir, trace_file)
    except (RuntimeError, OSError) as exc:
        raise DemoError(f"could not start the local stack: {exc}\n(logs under {base_dir})") from exc
    try:
        assert stack.cara is not None and stack.clm is not None
        _say(f"      up in {time.monotonic() - began:.1f} s: NATS {stack.env.nats.url}, MariaDB 127.0.0.1:"
             f"{stack.env.db.port}, CARA pid {stack.cara.pid}, CLM pid {stack.clm.pid}; logs in {base_dir / 'logs'}")
        setup_tracing("hapki-demo", trace_file)

        _say(f"[2/5] Generating a P-256 key and a CSR for {', '.join(DEMO_NAMES)}, asking CLM for a certificate ...")
        csr_pem, key_pem = new_key_and_csr(DEMO_NAMES)
        try:
            reply, trace_id, took = asyncio.run(_issue(stack.env.nats.nats_config("client"), csr_pem))
        except Exception as exc:  # nats timeouts and connection errors: the message says enough
            raise DemoError(f"no answer from CLM ({type(exc).__name__}: {exc}); see {base_dir / 'logs'}") from exc
        telemetry.shutdown()  # flush this process's spans (demo.issue, client.issue) to the trace file
        if reply.error is not None:
            error = reply.error
            raise DemoError(f"CLM refused the request: {error.code.value}: {error.message} {error.details or ''}")
        if not reply.certificate_pem:
            raise DemoError(f"no certificate after {took:.1f} s: the request is "
                            f"{reply.status.value if reply.status else '?'}; see {base_dir / 'logs'}")
        cert_pem, chain_pem = reply.certificate_pem, reply.chain_pem or ""
        _say(f"      issued in {took * 1000:.1f} ms (request {reply.request_id})")

        out.mkdir(parents=True, exist_ok=True)
        (out / "cert.pem").write_text(cert_pem)
        (out / "chain.pem").write_text(chain_pem)
        _write_private(out / "key.pem", key_pem)
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        chain = x509.load_pem_x509_certificates(chain_pem.encode()) if chain_pem.strip() else []
        _say()
        _say("[3/5] The certificate:")
        _print_certificate(cert, cert_pem)
        _say()
        _say("      Its chain, as CLM returned it (the issuing CA, then the self-signed root CA):")
        for ca in chain:
            _say(f"  {ca.subject.rfc4514_string()}  (issued by {ca.issuer.rfc4514_string()})")
            _say(ca.public_bytes(Encoding.PEM).decode().rstrip())
        _say()

        # The trust anchor is the root that `hapki ca init` wrote, not the one CLM just sent along.
        anchor = base_dir / "config" / "root.pem"
        if not anchor.exists():
            if not chain:
                raise DemoError("CLM returned no chain and there is no config/root.pem to verify against")
            anchor = out / "root.pem"
            anchor.write_bytes(chain[-1].public_bytes(Encoding.PEM))
        ok, command, output = _verify(base_dir, out, chain, anchor)
        _say(f"[4/5] Checking it with OpenSSL, against the root CA certificate in {anchor.relative_to(base_dir)}:")
        _say(f"  {base_dir}$ {command}")
        _say("  " + output.replace("\n", "\n  "))
        if not ok:
            raise DemoError("openssl did not accept the certificate (see above)")
        _say()

        _say(f"[5/5] The trace of this issuance (trace id {trace_id}), from {trace_file.name}:")
        spans = _wait_for_trace(trace_file, trace_id, TRACE_WAIT_SECONDS)
        _say(trace_tree(spans, trace_id))
        services = sorted({str(s.get("service")) for s in spans})
        _say(f"  {len(spans)} spans from {', '.join(services)}. Each line: a step, the service that did it, how long "
             "it took,")
        _say("  and when it started after the first span. CLM validated the CSR, recorded the request "
             "(db.commit clm.record)")
        _say("  and queued it (bus.publish); CARA took it (cara.sign), reserved a serial in a transaction that")
        _say("  commits only if the request was not done already (cara.reserve_fresh), had the HSM sign (hsm.sign),")
        _say("  stored the certificate")
        _say("  (cara.record_issued) and published the result; CLM passed it on to the waiting client (the _INBOX")
        _say("  publish is that reply).")
        stages = issuance_stages(spans).get(trace_id)
        if stages:
            split = ", ".join(f"{k} {stages[k]:.1f}" for k in STAGES)
            _say(f"  Time by stage (ms): {split} = {stages['e2e']:.1f} end to end (see hapki.lab.traces).")
        else:
            _say(f"  (the services' spans did not all arrive within {TRACE_WAIT_SECONDS:.0f} s; "
                 f"the file may still fill up: {trace_file})")
        _say()
        _say(f"Files: {out / 'cert.pem'}, {out / 'chain.pem'}, {out / 'key.pem'} (private key, mode 0600)")
        _say(f"Spans of every process: {trace_file}; service logs: {base_dir / 'logs'}")

        if keep:
            _say()
            _say("Everything keeps running until Ctrl-C. Try, in another terminal:")
            client = stack.env.nats.nats_config("client")
            _say(f"  {Path(sys.executable).parent / 'hapki'} issue --nats {stack.env.nats.url} "
                 f"--nats-user client --nats-password-file {client.password_file} --nats-ca {client.tls_ca_file} "
                 f"--name www.example.com --out /tmp/hapki-cert")
            _say(f"  NATS: {stack.env.nats.url}")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                _say()
        return 0
    finally:
        _say("Stopping CLM, CARA, NATS and MariaDB ...")
        stack.stop()
        _say(f"Stopped. State stays in {base_dir}; running the demo again reuses the CA.")


def run_demo(base_dir: Path, keep: bool) -> int:
    """Run the demo in `base_dir`; 0 on success, 1 with a message on stderr if a step failed, 130 on Ctrl-C."""
    base_dir = Path(base_dir).resolve()
    try:
        with sigterm_as_interrupt():
            return _demo(base_dir, keep)
    except DemoError as exc:
        print(f"hapki demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hapki demo interrupted; everything it started is stopped", file=sys.stderr)
        return 130
