"""A CARA signer worker: one more signer process on the active member (`[signer] processes` > 1).

The main CARA process (hapki.cara.signer_processes) starts it as `python -m hapki.cara.signer_worker` and talks to
it over pipes, one JSON object a line:
  parent -> worker (stdin):  {"config": {...}} once (the member's CaraConfig: paths and env names, never a secret),
                             {"issuer": name} at the start and after a rollover (issue as this issuing CA, read
                             from the database, from the next batch on),
                             then words {"epoch": N, "word": w} (sign under N) or {"epoch": null, "word": w}
                             (passive), w counting up. EOF: stop and exit.
  worker -> parent (stdout): {"state": "passive" | "active" | "fenced", "epoch": N | null, "word": w,
                             "signatures": n}: the state after acting on word w, on every change, and at most
                             every REPORT_SECONDS while only the signature count grows.
It opens its own database pool, bus connection and PKCS#11 session (python-pkcs11 on SoftHSM is not safe across
threads, so more signing means more processes) and runs the same Signer on the same durable consumer. It never
bumps the epoch (that would fence out its own member) and never resolves stale intents (the main signer did when
it bumped): it signs only under the epoch its parent obtained, while this host holds the VIP, and fenced by that
epoch, so it cannot commit once another start() moved the epoch on. Fenced, it stays passive until its parent
sends a newer epoch. It dies with its parent: PR_SET_PDEATHSIG, and EOF on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TextIO

from hapki.cara import issuance
from hapki.cara.config import CaraConfig
from hapki.cara.role import Ownership, first_of
from hapki.cara.signer import Signer
from hapki.cara.store import MariaDBSigningStore
from hapki.contracts import subjects
from hapki.contracts.errors import HapkiError
from hapki.runtime import bus, eventloop, telemetry
from hapki.runtime.approval import ApprovalVerifier
from hapki.runtime.clock import utcnow
from hapki.runtime.db import Database
from hapki.runtime.faults import FailPoints
from hapki.runtime.hsm import HSMPool
from hapki.runtime.netlink import VipOwnership
from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, load_profiles
from hapki.runtime.supervise import die_with_parent

log = logging.getLogger("hapki.cara.signer_worker")
REPORT_SECONDS = 1.0  # signature counts reach the parent's metrics at most this late


class SignerWorker:
    """Keeps one Signer in line with what the parent asks (an epoch or passive) and with the VIP."""

    def __init__(self, signer: Signer, ownership: Ownership | None, *, poll_seconds: float, out: TextIO,
                 recheck_seconds: float = 1.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._signer, self._ownership, self._poll, self._out = signer, ownership, poll_seconds, out
        self._recheck, self._monotonic = recheck_seconds, monotonic
        self._settled = False  # the last step left the signer as asked (active under the wanted epoch, or not)
        self._was_active = False  # the last step left the signer active: a fence is then worth waking for
        self._wanted: int | None = None  # the epoch the parent signs under; None: passive
        self._word = 0  # the number of the parent's latest word (its reports say which word they reflect)
        self._applied = 0  # the number of the latest word a step() has acted on
        self._fenced_at: int | None = None  # the epoch we were fenced out of: never joined again
        self._closing = False
        self._wake = asyncio.Event()
        self._reported: tuple[str, int | None, int, int] | None = None
        self._reported_at = 0.0

    def ask(self, epoch: int | None, word: int = 0) -> None:
        """The parent's word number `word`: sign under `epoch`, or be passive (None)."""
        self._wanted, self._word = epoch, word
        self._wake.set()

    def close(self) -> None:
        """Stop signing and end run() (stdin closed, SIGTERM)."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        """Reconcile at every word from the parent, VIP move the kernel announces and fence, until close().

        While the signer is as asked, the VIP is read again at least every recheck_seconds; while it is not
        (a join to retry), every poll_seconds."""
        self._report(force=True)
        try:
            while not self._closing:
                await self.step()
                await self._until_something_changes(self._recheck if self._settled else self._poll)
                self._wake.clear()
        finally:
            await self._signer.stop()  # hands back (NAK) what it fetched and did not process
            self._report(force=True)

    async def step(self) -> None:
        """One observation and the transitions it calls for."""
        signer = self._signer
        if signer.fenced.is_set() and signer.epoch is not None and self._fenced_at != signer.epoch:
            self._fenced_at = signer.epoch
            log.warning("fenced out of epoch %d: passive until the main signer sends a newer one", signer.epoch)
        word = self._word
        holds = self._ownership is None or self._ownership.holds()
        want = self._wanted if holds and self._wanted != self._fenced_at else None
        if signer.active and signer.epoch != want:
            await signer.stop()
        if want is not None and not signer.active:
            await signer.join(want)
        self._applied = word
        self._was_active = signer.active
        self._settled = signer.active == (want is not None) and (want is None or signer.epoch == want)
        self._report()

    async def _until_something_changes(self, timeout: float) -> None:
        """A word from the parent, an address change the kernel announces, the signer fenced (when the last step
        left it active: a fence since then has set the event already), or ``timeout``."""
        waits: list[Awaitable[object]] = [self._wake.wait()]
        if self._ownership is not None:
            waits.append(self._ownership.changed(timeout))
        if self._was_active:
            waits.append(self._signer.fenced.wait())
        await first_of(*waits, timeout=timeout)

    def _report(self, *, force: bool = False) -> None:
        """Tell the parent a change of state or epoch at once; a grown signature count every REPORT_SECONDS."""
        signer = self._signer
        state = "active" if signer.active else "fenced" if signer.fenced.is_set() else "passive"
        now = (state, signer.epoch, self._applied, signer.signatures)
        last = self._reported
        if not force and last is not None and (now == last or (
                now[:3] == last[:3] and self._monotonic() - self._reported_at < REPORT_SECONDS)):
            return
        self._reported, self._reported_at = now, self._monotonic()
        try:
            self._out.write(json.dumps({"state": state, "epoch": signer.epoch, "word": self._applied,
                                        "signatures": signer.signatures}) + "\n")
            self._out.flush()
        except BrokenPipeError:  # the main process is gone: nobody to tell, nobody to sign for
            log.warning("main process gone (its pipe is closed): stopping")
            self.close()


async def _commands(worker: SignerWorker, reader: asyncio.StreamReader,
                    use_issuer: Callable[[str], Awaitable[None]]) -> None:
    """The parent's words, until EOF (the parent closed the pipe or died); then, or on any failure, stop."""
    try:
        while line := await reader.readline():
            try:
                word = json.loads(line)
                issuer = word.get("issuer")
                if not isinstance(issuer, str):
                    epoch, number = word["epoch"], int(word["word"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("unreadable word from the main process (%s): %r; stopping", exc, line[:200])
                break
            if isinstance(issuer, str):
                try:
                    await use_issuer(issuer)
                except (HapkiError, ValueError) as exc:  # database down, key missing or unsafe: start over later
                    log.error("cannot issue as %s (%s); stopping (the main process starts this worker again)",
                              issuer, exc)
                    break
                continue
            worker.ask(epoch if isinstance(epoch, int) else None, number)
    finally:
        worker.close()


async def _stdin() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def serve(index: int, out: TextIO) -> None:
    """Read the config, open this process's own connections and HSM session, then follow the parent."""
    from hapki.cara.main import hsm_pool  # the same pool the main process builds from the same section

    reader = await _stdin()
    first = await reader.readline()
    if not first:
        raise SystemExit("signer worker: stdin closed before the config arrived")
    cfg = CaraConfig.model_validate(json.loads(first)["config"])
    approvals = ApprovalVerifier.from_files(cfg.approval_public_keys)
    profiles = load_profiles(cfg.profiles_file or SHIPPED_PROFILES_PATH)
    db = Database(cfg.database)
    hsm: HSMPool | None = None
    nc = None
    ownership = VipOwnership(cfg.vip, announced=True) if cfg.vip is not None else None
    try:
        store = MariaDBSigningStore(db, actor=f"cara:{cfg.member}")
        issuer = await store.load_issuer(cfg.issuer)
        hsm = hsm_pool(cfg.hsm)
        hsm.open()
        await asyncio.to_thread(hsm.verify_keys, [issuer.key_id])
        nc = await bus.connect(cfg.nats, name=f"hapki-cara-{cfg.member}-signer-{index}",
                               stream=subjects.SIGNING_STREAM)
        signer = Signer(
            nc=nc, js=nc.jetstream(), store=store, issuer=issuer, issuer_key=hsm.private_key(issuer.key_id),
            member=cfg.member, config=cfg.signer, clock=utcnow, approvals=approvals, profiles=profiles,
            faults=FailPoints(), distribution=issuance.Distribution.at(cfg.public_url, issuer.name))
        worker = SignerWorker(signer, ownership, poll_seconds=cfg.vip_poll_seconds,
                              recheck_seconds=cfg.vip_recheck_seconds, out=out)

        async def use_issuer(name: str) -> None:
            """Issue as `name` (a rollover): read from the database, its key checked in this process's session."""
            assert hsm is not None
            if name == signer.issuer.name:
                return
            record = await store.load_issuer(name)
            await asyncio.to_thread(hsm.verify_keys, [record.key_id])
            signer.use_issuer(record, hsm.private_key(record.key_id),
                              issuance.Distribution.at(cfg.public_url, record.name))

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.close)
        listening = asyncio.create_task(_commands(worker, reader, use_issuer))
        log.info("signer worker %d of %s ready (pid %d)", index, cfg.member, os.getpid())
        await worker.run()
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening  # a failure of the listener (other than our cancel) is raised here
    finally:
        if ownership is not None:
            ownership.close()
        if nc is not None:
            await nc.close()
        if hsm is not None:
            hsm.close()
        await db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hapki.cara.signer_worker",
                                     description="a CARA signer worker (started by the main CARA process)")
    parser.add_argument("--index", type=int, required=True, help="this worker's number (1..processes-1)")
    parser.add_argument("--member", required=True, help="the member it signs for (logs)")
    parser.add_argument("--parent-pid", type=int, required=True, help="exit when this process is gone")
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    # The reports own stdout: anything else printed goes to stderr (the parent's log) instead of into the pipe.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    telemetry.setup_logging(process=f"{args.member} signer {args.index}")
    telemetry.setup("hapki-cara-signer")
    try:
        eventloop.run(serve(args.index, out))
    finally:
        telemetry.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
