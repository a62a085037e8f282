"""Fail points: armed by HAPKI_FAULTS, and with an arm file only while that file exists."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hapki.runtime.faults import FailPoints


def test_an_unarmed_point_does_nothing(tmp_path: Path) -> None:
    asyncio.run(FailPoints("", marker_dir=str(tmp_path)).hit("cara.after_sign"))


def test_a_point_with_an_arm_file_acts_only_while_the_file_exists(tmp_path: Path) -> None:
    arm = tmp_path / "armed"
    points = FailPoints("cara.after_sign=pause", marker_dir=str(tmp_path), arm_file=str(arm))

    async def hit() -> bool:
        try:
            await asyncio.wait_for(points.hit("cara.after_sign"), 0.2)
        except TimeoutError:
            return True  # paused: the point acted
        return False

    assert asyncio.run(hit()) is False
    assert not (tmp_path / "cara.after_sign").exists()
    arm.touch()
    assert asyncio.run(hit()) is True
    assert (tmp_path / "cara.after_sign").exists()


def test_a_bad_action_is_refused() -> None:
    with pytest.raises(ValueError, match="bad fault action"):
        FailPoints("cara.after_sign=explode")
