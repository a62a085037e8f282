"""Named fail points for fault tests: crash or freeze a process at a precise step.

Off unless HAPKI_FAULTS is set, e.g. `HAPKI_FAULTS=cara.after_sign=crash`. Actions:
- crash: SIGKILL this process (a real crash: no cleanup, no ack, no commit);
- pause: write `<HAPKI_FAULTS_DIR>/<point>` and hang until killed, so a test can kill at that step itself.

With HAPKI_FAULTS_ARM_FILE set, armed points act only while that file exists: a fault test starts the process
with the point armed and chooses the moment (the fault suite crashes a signer mid-load this way).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path


class FailPoints:
    """Parsed HAPKI_FAULTS; `hit(point)` acts when the point is armed."""

    def __init__(self, spec: str | None = None, marker_dir: str | None = None, arm_file: str | None = None) -> None:
        spec = os.environ.get("HAPKI_FAULTS", "") if spec is None else spec
        self._armed: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            point, _, action = item.partition("=")
            if action not in ("crash", "pause"):
                raise ValueError(f"bad fault action {action!r} for {point!r}: use crash or pause")
            self._armed[point] = action
        self._dir = Path(marker_dir or os.environ.get("HAPKI_FAULTS_DIR", "."))
        arm = arm_file if arm_file is not None else os.environ.get("HAPKI_FAULTS_ARM_FILE", "")
        self._arm_file = Path(arm) if arm else None

    async def hit(self, point: str) -> None:
        action = self._armed.get(point)
        if action is None or (self._arm_file is not None and not self._arm_file.exists()):
            return
        if action == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        (self._dir / point).write_text(str(os.getpid()))
        await asyncio.Event().wait()
