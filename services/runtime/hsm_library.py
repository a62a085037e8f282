"""Loaded PKCS#11 modules and the process-wide lock around every PKCS#11 call.

- python-pkcs11 calls C_Initialize(NULL), so SoftHSM runs without internal locking: two threads, even with a
  session each, crash the process. Every PKCS#11 call in the process holds `PKCS11_LOCK`.
- python-pkcs11 loads a module path once per process, so members that name the same path share one library
  instance (one set of slots, one login state per token, one C_Initialize).
- SoftHSM reads SOFTHSM2_CONF at every C_Initialize (first load and reinitialize alike), and only then: it is set
  around both and restored afterwards. Members needing different configs need copies of the .so at different
  paths (a copied file is a separate library instance with its own state).
- Someone else in the process may load or finalize the same path through python-pkcs11 directly (its cache is
  per path); `get()` re-initializes a finalized library, and the sessions it voided fail and are reopened.
- SoftHSM's C_Initialize looks for OpenSSL's rdrand engine, which OpenSSL 3 lacks, and leaves the failure (ENGINE
  NO_SUCH_ENGINE) on the calling thread's OpenSSL error queue. Python's ssl module links the same libcrypto and
  reads that queue when a TLS read returns no data yet: the next read of any TLS connection on that thread (a
  database or NATS connection on the event loop's) then fails as "Lost connection ... no such engine", once.
  Every load, initialize, reinitialize and finalize here clears the calling thread's queue afterwards
  (`clear_openssl_errors`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pkcs11

def _error_queue_clearer() -> Callable[[], None]:
    """ERR_clear_error of the libcrypto the ssl module uses (the system's, which SoftHSM links too); a no-op where
    there is none to find."""
    import ssl  # noqa: F401  (loads _ssl, and with it libcrypto, before it is looked up by name)

    name = ctypes.util.find_library("crypto")
    if name is None:
        return lambda: None
    try:
        clear: Callable[[], None] = ctypes.CDLL(name).ERR_clear_error
    except (OSError, AttributeError):
        return lambda: None
    return clear


clear_openssl_errors = _error_queue_clearer()
"""Empty the calling thread's OpenSSL error queue (see the module's docstring: what SoftHSM leaves there)."""

PKCS11_LOCK = threading.Lock()
"""Held around every PKCS#11 call in the process (SoftHSM is not thread-safe under python-pkcs11)."""


class Library:
    """A loaded PKCS#11 module, shared by every member in the process that names the same path.

    Open pools `attach` their members (claiming the SOFTHSM2_CONF they need) and `detach` them on close. While
    claimed, the config is fixed; when the last claim goes, the library is finalized, so the next user (a later
    pool with another config, or plain python-pkcs11 code) initializes it afresh. Methods run with PKCS11_LOCK held.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.conf: Path | None = None
        self.claims = 0
        self.lib: Any = None  # pkcs11.lib once loaded
        # Bumped on every (re)initialize: sessions opened under an older generation are void, and their handle
        # numbers may now belong to someone else's session, so they are dropped without being closed.
        self.generation = 0

    def attach(self, conf: Path | None, member: str) -> None:
        """Claim the library for a member that needs `conf`; refuse while others hold it with another config."""
        if conf != self.conf:
            if self.claims:
                raise ValueError(
                    f"member {member}: {self.path} is in use with SOFTHSM2_CONF={self.conf}; a module path "
                    "serves one config at a time per process (copy the .so to another path)"
                )
            self._finalize()
            self.conf = conf
        self.claims += 1

    def detach(self) -> None:
        """Drop one claim; the last one finalizes the library (every session on it ends)."""
        self.claims = max(0, self.claims - 1)
        if not self.claims:
            self._finalize()

    def _finalize(self) -> None:
        if self.lib is not None and self.lib.initialized:
            self.generation += 1
            try:
                self.lib.finalize()
            except pkcs11.PKCS11Error:
                pass  # python-pkcs11 marks it uninitialized either way; get() initializes again
            finally:
                clear_openssl_errors()

    @contextlib.contextmanager
    def _conf_in_env(self) -> Iterator[None]:
        """SOFTHSM2_CONF = this library's config during C_Initialize; the previous value is restored after."""
        if self.conf is None:
            yield
            return
        previous = os.environ.get("SOFTHSM2_CONF")
        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        try:
            yield
        finally:
            if previous is None:
                del os.environ["SOFTHSM2_CONF"]
            else:
                os.environ["SOFTHSM2_CONF"] = previous

    def get(self) -> Any:
        """The initialized library, loading or initializing it first when needed."""
        if self.lib is None:
            with self._conf_in_env(), _then_clear_openssl_errors():
                self.lib = pkcs11.lib(self.path)
            self.generation += 1
        elif not self.lib.initialized:  # finalized by detach, a failed reinitialize, or code outside this module
            with self._conf_in_env(), _then_clear_openssl_errors():
                self.lib.initialize()
            self.generation += 1
        return self.lib

    def reinitialize(self) -> Any:
        """C_Finalize + C_Initialize: voids every session of every member on this library."""
        if self.lib is None or not self.lib.initialized:
            return self.get()
        self.generation += 1
        with self._conf_in_env(), _then_clear_openssl_errors():
            self.lib.reinitialize()
        return self.lib


@contextlib.contextmanager
def _then_clear_openssl_errors() -> Iterator[None]:
    try:
        yield
    finally:
        clear_openssl_errors()


_LIBRARIES: dict[str, Library] = {}
_REGISTRY_LOCK = threading.Lock()  # not PKCS11_LOCK: callers may already hold that one


def library_for(module_path: str) -> Library:
    """The process's one Library for `module_path`."""
    with _REGISTRY_LOCK:
        return _LIBRARIES.setdefault(module_path, Library(module_path))
