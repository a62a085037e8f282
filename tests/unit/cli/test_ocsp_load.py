"""hapki.cli.ocsp_load (the `bench --ocsp` client) against a local TLS server, and the bench's request mix and table."""

from __future__ import annotations

import http.server
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from hapki.cli import bench_revocation, ocsp_load
from hapki.lab.tls import create_infra_ca, issue_server_cert

NOW = datetime.now(UTC).replace(microsecond=0)


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "load test CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return key, cert


def _answer(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, serial: int) -> tuple[bytes, bytes]:
    """(DER request, DER good response) about `serial`."""
    request = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        b"\x00" * 20, b"\x01" * 20, serial, hashes.SHA1()).build().public_bytes(serialization.Encoding.DER)
    response = ocsp.OCSPResponseBuilder().add_response_by_hash(
        issuer_name_hash=b"\x00" * 20, issuer_key_hash=b"\x01" * 20, serial_number=serial, algorithm=hashes.SHA1(),
        cert_status=ocsp.OCSPCertStatus.GOOD, this_update=NOW, next_update=NOW + timedelta(hours=1),
        revocation_time=None, revocation_reason=None,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, cert).sign(key, hashes.SHA256())
    return request, response.public_bytes(serialization.Encoding.DER)


def test_the_load_generator_keeps_connections_checks_answers_and_names_who_answered(tmp_path: Path) -> None:
    key, cert = _ca()
    (req_a, resp_a), (req_b, resp_b) = _answer(key, cert, 0xA1), _answer(key, cert, 0xB2)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, body: bytes, extra: dict[str, str]) -> None:
            self.send_response(200)
            for name, value in {"Content-Type": "application/ocsp-response",
                                "Content-Length": str(len(body)), **extra}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            # The answer about 0xb2 is wrong on purpose: asked about b2, it answers about a1.
            self._send(resp_a, {"Age": "0"})

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(resp_a, {"X-Hapki-Ocsp-Source": "cache"})

        def log_message(self, *args: object) -> None:
            return None

    ca = create_infra_ca(tmp_path)
    pem = issue_server_cert(ca, tmp_path, "server", ["127.0.0.1"], [])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = ocsp_load.Target("127.0.0.1", server.server_address[1], "127.0.0.1", ca.cert_path)
        probes = bench_revocation.probes_for("127.0.0.1", [(0xA1, req_a), (0xB2, req_b)], post_every=2)
        assert [p.method for p in probes] == ["GET", "GET", "POST", "POST"]
        result = ocsp_load.run(target, probes, concurrency=2, seconds=0.5, warmup=0.1)
    finally:
        server.shutdown()
    assert result["connections"] == 2  # one per client, kept alive
    assert result["sources"].get("haproxy", 0) > 0 and result["sources"].get("cache", 0) > 0
    assert result["errors"] > 0 and "asked b2" in result["error_samples"][0]
    assert set(result["methods"]) == {"GET", "POST"}


def test_the_ocsp_table_names_the_path_and_the_machine() -> None:
    report = {"ocsp": {"url": "https://10.213.2.100", "certificates": 16, "post_every": 10, "levels": [
        {"concurrency": 16, "responses_per_second": 5100.0, "p50_ms": 2.5, "p99_ms": 9.0, "errors": 0,
         "machine_cpu_percent": 190, "connections": 16, "sources": {"haproxy": 900, "cache": 99, "produced": 1},
         "error_samples": [], "cpu_ms_per_answer": {"haproxy": 0.028, "cara": 0.0251}}]}}
    text = bench_revocation.table(report)
    assert "TLS, keep-alive, 16 certificates, GET with 1 in 10 POST" in text
    assert "     16       5100.0      2.5      9.0       0     190%     16  90.0% / 9.9% / 0.1%" in text
    assert "CPU ms per answer: haproxy 0.028, cara 0.025" in text
