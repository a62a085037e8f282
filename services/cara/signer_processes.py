"""Several signer processes on the active member: the main process's Signer plus `processes - 1` signer workers.

python-pkcs11 on SoftHSM is not safe across threads, so one process signs through one PKCS#11 session; more
signing throughput (where there are spare cores) takes more processes. SignerProcesses is what the role supervisor
drives in place of the Signer: start() bumps the epoch through the main Signer as before, then tells every worker
(hapki.cara.signer_worker) to sign under that epoch; stop() makes them all passive and waits until they handed
back what they fetched. The workers follow the parent's word rather than the `epochs` row: the parent is the one
place that decides this member's role, and a worker never has to guess whether an epoch held by its member's
name is its parent's current one or a leftover of an earlier run. Each worker also checks the VIP itself, and
every commit it makes is fenced by the epoch, so a worker that missed a word still cannot commit under a newer
epoch. A worker that exits is started again; a parent that dies takes its workers with it (PR_SET_PDEATHSIG,
EOF on their stdin).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from hapki.cara import issuance
from hapki.cara.config import CaraConfig
from hapki.cara.ports import IssuerRecord
from hapki.cara.signer import Signer
from hapki.contracts.errors import Unavailable
from hapki.runtime.metrics import State
from hapki.runtime.tasks import cancel_and_wait

log = logging.getLogger("hapki.cara.signer_processes")
READY_TIMEOUT_SECONDS = 60.0  # a worker opens its database pool, HSM session and bus connection in this time
STOP_TIMEOUT_SECONDS = 15.0  # passive, or exited: batches in progress finish and hand back within this
RESTART_DELAY_SECONDS = 1.0


@dataclass
class WorkerSlot:
    """One worker process as its parent sees it (the last report it made)."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    state: str = "starting"  # starting, passive, active, fenced, exited
    epoch: int | None = None
    word: int = 0  # the parent's latest word the worker has acted on
    signatures: int = 0  # of this process's life; earlier lives' counts are in `signed_before`
    signed_before: int = 0
    starts: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    @property
    def total_signatures(self) -> int:
        return self.signed_before + self.signatures


class SignerProcesses:
    """The member's signer processes, driven as one (the role supervisor's Activatable; an Activity for metrics)."""

    def __init__(self, signer: Signer, config: CaraConfig, *, python: str = sys.executable) -> None:
        self._signer, self._config, self._python = signer, config, python
        self.workers = [WorkerSlot(index) for index in range(1, config.signer.processes)]
        self._wanted: int | None = None  # the epoch the workers are told to sign under; None: passive
        self._word = 0  # numbers the words to the workers, so a report says which word it reflects
        self._closing = False
        self._supervisors: list[asyncio.Task[None]] = []
        self._fence_watch: asyncio.Task[None] | None = None
        self._attributes: list[dict[str, str]] = []

    # The Activatable the role supervisor drives: the main signer decides (its epoch, its fencing).
    @property
    def fenced(self) -> asyncio.Event:
        return self._signer.fenced

    @property
    def active(self) -> bool:
        return self._signer.active

    @property
    def epoch(self) -> int | None:
        return self._signer.epoch

    @property
    def signatures(self) -> int:
        """HSM signatures made by all of the member's signer processes (workers: as last reported)."""
        return self._signer.signatures + sum(w.total_signatures for w in self.workers)

    async def open(self) -> None:
        """Start the workers and wait until each has its connections and HSM session; Unavailable if one fails."""
        gauge = State.of("hapki.cara.signer.signatures")
        member = self._config.member
        self._attributes = [{"pki.member": member, "pki.signer": "0"}]
        gauge.watch(self._attributes[0], lambda: self._signer.signatures)
        for slot in self.workers:
            attributes = {"pki.member": member, "pki.signer": str(slot.index)}
            gauge.watch(attributes, lambda slot=slot: slot.total_signatures)
            self._attributes.append(attributes)
        self._supervisors = [asyncio.create_task(self._supervise(slot)) for slot in self.workers]
        try:
            await asyncio.wait_for(asyncio.gather(*(self._ready(slot) for slot in self.workers)),
                                   READY_TIMEOUT_SECONDS)
        except asyncio.TimeoutError as exc:
            await self.close()
            raise Unavailable(f"signer workers of {member} not ready within {READY_TIMEOUT_SECONDS:.0f} s",
                              {"states": {slot.index: slot.state for slot in self.workers}}) from exc
        except Unavailable:
            await self.close()
            raise
        log.info("%d signer workers of %s ready: pids %s", len(self.workers), member,
                 [slot.pid for slot in self.workers])

    async def _ready(self, slot: WorkerSlot) -> None:
        while slot.state == "starting":
            slot.changed.clear()
            await slot.changed.wait()
        if slot.state == "exited":
            raise Unavailable(f"signer worker {slot.index} of {self._config.member} exited while starting "
                              "(its log lines are in this process's log)", {"worker": slot.index})

    def use_issuer(self, issuer: IssuerRecord, issuer_key: ec.EllipticCurvePrivateKey,
                   distribution: issuance.Distribution | None) -> None:
        """Issue as `issuer` from now on (a rollover): the main signer at its next batch, each worker once it read
        the issuer from the database (a worker started later is told at its start)."""
        self._signer.use_issuer(issuer, issuer_key, distribution)
        for slot in self.workers:
            self._tell(slot, {"issuer": issuer.name})

    async def start(self) -> int:
        """Become active: the main signer bumps the epoch; then every worker is told to sign under it."""
        epoch = await self._signer.start()
        self._tell_all(epoch)
        if self._fence_watch is not None:
            self._fence_watch.cancel()
        self._fence_watch = asyncio.create_task(self._passive_when_fenced(epoch))
        return epoch

    async def stop(self) -> None:
        """Become passive: every process stops fetching and hands back what it did not process."""
        if self._fence_watch is not None:
            self._fence_watch.cancel()
            self._fence_watch = None
        self._tell_all(None)
        await asyncio.gather(self._signer.stop(), self._workers_passive())

    async def close(self) -> None:
        """Stop the workers (EOF on their stdin: they stop and exit; killed after STOP_TIMEOUT_SECONDS)."""
        self._closing = True
        if self._fence_watch is not None:
            self._fence_watch.cancel()
        for slot in self.workers:
            if slot.proc is not None and slot.proc.stdin is not None and not slot.proc.stdin.is_closing():
                slot.proc.stdin.close()
        for slot in self.workers:
            if slot.proc is None or slot.proc.returncode is not None:
                continue
            try:
                await asyncio.wait_for(slot.proc.wait(), STOP_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                log.error("signer worker %d (pid %d) did not exit in %.0f s; killing it", slot.index,
                          slot.proc.pid, STOP_TIMEOUT_SECONDS)
                slot.proc.kill()
                await slot.proc.wait()
        for slot, task in zip(self.workers, self._supervisors):
            try:
                await cancel_and_wait(task)  # a cancel lost inside it must not hang the stop
            except Exception:  # a supervisor that had failed: said here, and the stop goes on
                log.exception("the supervisor of signer worker %d had failed", slot.index)
        gauge = State.of("hapki.cara.signer.signatures")
        for attributes in self._attributes:
            gauge.discard(attributes)

    async def _passive_when_fenced(self, epoch: int) -> None:
        """The main signer was fenced out of `epoch`: the workers stop too (their commits would fail anyway)."""
        await self._signer.fenced.wait()
        if self._wanted == epoch:
            log.info("main signer fenced out of epoch %d: signer workers passive", epoch)
            self._tell_all(None)

    def _tell_all(self, epoch: int | None) -> None:
        self._wanted = epoch
        self._word += 1
        for slot in self.workers:
            self._tell(slot, {"epoch": epoch, "word": self._word})

    def _tell(self, slot: WorkerSlot, word: dict[str, object]) -> None:
        stdin = slot.proc.stdin if slot.proc is not None else None
        if stdin is None or stdin.is_closing() or slot.proc is None or slot.proc.returncode is not None:
            return  # not running: its supervisor tells it the current word when it starts again
        stdin.write(json.dumps(word).encode() + b"\n")

    async def _workers_passive(self) -> None:
        """Until every running worker acted on the latest word (passive) and so handed back what it fetched."""
        word = self._word

        async def passive(slot: WorkerSlot) -> None:
            # A worker still starting has no signer running yet; it is told the latest word when it is up.
            while slot.state not in ("exited", "starting") and (slot.word < word or slot.state == "active"):
                slot.changed.clear()
                await slot.changed.wait()

        try:
            await asyncio.wait_for(asyncio.gather(*(passive(slot) for slot in self.workers)), STOP_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            log.error("signer workers still active %.0f s after being told to stop: %s", STOP_TIMEOUT_SECONDS,
                      [slot.index for slot in self.workers if slot.state == "active"])

    async def _supervise(self, slot: WorkerSlot) -> None:
        """Run the worker; start it again when it exits, unless we are closing."""
        while not self._closing:
            await self._run_once(slot)
            if self._closing:
                break
            log.error("signer worker %d of %s exited (code %s); starting it again in %.0f s", slot.index,
                      self._config.member, slot.proc.returncode if slot.proc else None, RESTART_DELAY_SECONDS)
            await asyncio.sleep(RESTART_DELAY_SECONDS)

    async def _run_once(self, slot: WorkerSlot) -> None:
        slot.signed_before += slot.signatures
        slot.signatures, slot.state, slot.epoch, slot.word = 0, "starting", None, 0
        slot.starts += 1
        # stderr is ours: the worker's log lines land in this process's log, tagged "<member> signer <index>".
        slot.proc = await asyncio.create_subprocess_exec(
            self._python, "-m", "hapki.cara.signer_worker", "--index", str(slot.index),
            "--member", self._config.member, "--parent-pid", str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert slot.proc.stdin is not None and slot.proc.stdout is not None
        self._tell(slot, {"config": self._config.model_dump(mode="json")})
        self._tell(slot, {"issuer": self._signer.issuer.name})  # the one issued from now, maybe not the config's
        self._tell(slot, {"epoch": self._wanted, "word": self._word})
        try:
            while line := await slot.proc.stdout.readline():
                try:
                    report = json.loads(line)
                    slot.state, slot.epoch = report["state"], report["epoch"]
                    slot.word, slot.signatures = report["word"], report["signatures"]
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("unreadable report from signer worker %d: %s: %r", slot.index, exc, line[:200])
                    continue
                slot.changed.set()
        finally:
            if slot.proc.stdin is not None and not slot.proc.stdin.is_closing():
                slot.proc.stdin.close()
            await slot.proc.wait()
            slot.state = "exited"
            slot.changed.set()
