"""SoftHSM's C_Initialize and the TLS connections of the same process (hapki.runtime.hsm_library).

SoftHSM looks for OpenSSL's rdrand engine at C_Initialize and leaves the failure on the calling thread's OpenSSL
error queue; Python's ssl module shares that libcrypto, so the next TLS read on the thread failed ("no such
engine"): at CARA's start the first database transaction failed and marked a healthy Galera node unusable, and so
did every ceremony (`hapki ca init`, `hapki ca rollover`). Here on a real SoftHSM token and a real TLS connection.
"""

from __future__ import annotations

import asyncio
import datetime
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest_hsm import TOKEN, SoftHSMStore, softhsm  # noqa: F401  (fixture)
from hapki.runtime.hsm import HSMMemberConfig, HSMPool

pytestmark = pytest.mark.integration


def _tls_files(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "tls.pem", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture
async def tls_echo(tmp_path: Path) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A TLS connection on this thread's event loop to an echo server on loopback."""
    cert_file, key_file = _tls_files(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_file, key_file)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(cert_file))
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
    try:
        yield reader, writer
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str) -> str:
    writer.write(text.encode() + b"\n")
    await writer.drain()
    return (await asyncio.wait_for(reader.readline(), 5)).decode().strip()


async def test_a_pkcs11_initialize_leaves_the_threads_tls_connections_working(softhsm: SoftHSMStore, tls_echo,
                                                                              tmp_path: Path) -> None:
    reader, writer = tls_echo
    assert await _round_trip(reader, writer, "before") == "before"
    # A copy of the module: a library instance of its own, so this C_Initialize really runs (on this thread).
    module = tmp_path / "libsofthsm2-initialize.so"
    shutil.copyfile(softhsm.module_path, module)
    pool = HSMPool([HSMMemberConfig(name="hsm-init", module_path=str(module), token_label=TOKEN,
                                    pin_file=softhsm.pin_file, softhsm_conf=softhsm.conf)])
    pool.open()
    try:
        assert pool.health() == {"hsm-init": True}
        assert await _round_trip(reader, writer, "after C_Initialize") == "after C_Initialize"
    finally:
        pool.close()
    assert await _round_trip(reader, writer, "after C_Finalize") == "after C_Finalize"
