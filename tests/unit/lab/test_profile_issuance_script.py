"""scripts/profile_issuance.py's py-spy mode: samples charged to their innermost Python frame, grouped by package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers.scripts import load_script

ROOT = Path(__file__).resolve().parents[3]


def test_each_sample_goes_to_its_innermost_frame_and_that_frames_package() -> None:
    script = load_script("profile_issuance")
    site = f"{sys.prefix}/lib/python3.11/site-packages"
    raw = [
        # root first; the counts are the samples of that exact stack
        f"process 1:\"hapki serve cara\";run (/usr/lib/python3.11/asyncio/runners.py:118);"
        f"sign (/x/{ROOT}/services/runtime/hsm.py:200);sign ({site}/pkcs11/types.py:1122) 7",
        f"process 1:\"hapki serve cara\";run (/usr/lib/python3.11/asyncio/runners.py:118);"
        f"parse_csr ({ROOT}/services/cara/issuance.py:70) 2",
        f"process 1:\"hapki serve cara\";run (/usr/lib/python3.11/asyncio/runners.py:118) 1",
        f"process 1:\"hapki serve cara\";escape ({site}/aiomysql/connection.py:416) 3",
        "garbage without a count",
        "",
    ]
    total, groups, functions = script.sampled_shares(raw)
    assert total == 13
    assert groups == {"python-pkcs11": 7, "database driver (aiomysql + PyMySQL)": 3, "hapki code": 2,
                      "asyncio (event loop, streams, TLS)": 1}
    assert list(groups) == sorted(groups, key=lambda g: -groups[g])  # most samples first
    # the caller's frames are not charged: hsm.py's sign holds the sample only through pkcs11's
    assert functions["sign (pkcs11/types.py)"] == 7
    assert functions["parse_csr (services/cara/issuance.py)"] == 2
    assert not any("hsm.py" in f for f in functions)


def test_the_lab_is_sampled_only_by_py_spy_and_only_when_it_is_up(tmp_path, monkeypatch, capsys) -> None:
    script = load_script("profile_issuance")
    monkeypatch.setattr(script.k6, "make_csrs", lambda n: ["csr"] * n)  # no key generation for an argument check
    monkeypatch.setattr(sys, "argv", ["profile_issuance.py", "--lab", str(tmp_path / "lab"), "--dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs --sampler py-spy"):
        script.main()
    monkeypatch.setattr(sys, "argv", ["profile_issuance.py", "--lab", str(tmp_path / "lab"), "--sampler", "py-spy",
                                      "--dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="is not up"):
        script.main()
