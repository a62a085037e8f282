"""The bus permission table: who may publish and subscribe to what (issue 6)."""

from __future__ import annotations

import json

import bcrypt
import pytest

from hapki.contracts import subjects
from hapki.runtime.bus_auth import MIN_PASSWORD_CHARS, ROLES, User, accounts_conf, hash_password, inbox_prefix

_HASH = hash_password("pw" * 11)


def _matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def _may(role: str, verb: str, subject: str, user: str | None = None) -> bool:
    perms = ROLES[role]
    allowed = [p.replace("{scope}", ">") for p in (perms.publish if verb == "pub" else perms.subscribe)]
    if verb == "sub" and role != "admin":
        allowed.append(f"{inbox_prefix(user or role)}.>")
    return any(_matches(p, subject) for p in allowed)


SIGNER = f"{subjects.SIGNING_STREAM}.{subjects.SIGNING_CONSUMER}"


@pytest.mark.parametrize(("role", "verb", "subject", "allowed"), [
    ("client", "pub", subjects.CLM_ISSUE, True),
    ("client", "pub", subjects.CARA_SIGN, False),
    ("client", "pub", subjects.CLM_REVOKED, False),
    ("client", "pub", subjects.ha_events("cara", "cara-1"), False),
    ("client", "sub", subjects.CARA_ISSUED, False),
    ("client", "sub", "_INBOX.client.abc", True),
    ("client", "sub", "_INBOX.clm.abc", False),
    ("clm", "pub", subjects.CARA_SIGN, True),
    ("clm", "sub", subjects.CARA_SIGN, False),
    ("clm", "pub", f"$JS.API.CONSUMER.MSG.NEXT.{SIGNER}", False),
    ("clm", "pub", f"$JS.API.CONSUMER.CREATE.{subjects.SIGNING_STREAM}", False),
    ("clm", "pub", subjects.ha_events("clm", "clm-1"), False),
    ("cara", "pub", f"$JS.API.CONSUMER.MSG.NEXT.{SIGNER}", True),
    ("cara", "pub", f"$JS.ACK.{SIGNER}.1.2.3.4.5.6", True),
    ("cara", "pub", subjects.CARA_ISSUED, True),
    ("cara", "pub", subjects.CARA_SIGN, False),
    ("cara", "pub", f"$JS.API.STREAM.DELETE.{subjects.SIGNING_STREAM}", False),
    ("watcher", "pub", subjects.ha_events("cara", "cara-1"), True),
    ("watcher", "pub", subjects.CARA_SIGN, False),
])
def test_permission_table(role: str, verb: str, subject: str, allowed: bool) -> None:
    assert _may(role, verb, subject) is allowed


def test_only_the_signer_and_admin_reach_the_signing_consumer() -> None:
    for role in ROLES:
        if role in ("cara", "admin"):
            continue
        for pattern in ROLES[role].publish:
            # CLM, the producer, may look the stream up (message counts), nothing more.
            assert subjects.SIGNING_STREAM not in pattern or (role, pattern) == (
                "clm", f"$JS.API.STREAM.INFO.{subjects.SIGNING_STREAM}"), (role, pattern)
            assert not _matches(pattern, f"$JS.API.CONSUMER.MSG.NEXT.{SIGNER}"), (role, pattern)


def test_a_scoped_watcher_publishes_only_its_members_events() -> None:
    body = json.loads(accounts_conf([User("watcher-cara-1", "watcher", _HASH, "cara.cara-1")]).removeprefix("accounts: "))
    allowed = body["HAPKI"]["users"][0]["permissions"]["publish"]["allow"]
    assert subjects.ha_events("cara", "cara-1") in allowed
    assert not any(_matches(p, subjects.ha_events("cara", "cara-2")) for p in allowed)


def test_accounts_conf_is_json_with_every_user() -> None:
    text = accounts_conf([User("client", "client", _HASH), User("clm", "clm", _HASH)])
    body = json.loads(text.removeprefix("accounts: "))
    [client], [clm] = body["CLIENTS"]["users"], body["HAPKI"]["users"]
    assert body["HAPKI"]["jetstream"] == "enabled" and "jetstream" not in body["CLIENTS"]
    assert client["password"] == _HASH
    assert client["permissions"]["subscribe"]["allow"] == ["_INBOX.client.>"]
    assert clm["permissions"]["allow_responses"] is True


def test_clients_reach_the_clm_api_only_through_an_import_that_names_them() -> None:
    body = json.loads(accounts_conf([User("client", "client", _HASH)]).removeprefix("accounts: "))
    api = set(ROLES["client"].publish)
    assert {e["service"] for e in body["HAPKI"]["exports"]} == api  # nothing else of the services' account
    imports = body["CLIENTS"]["imports"]
    assert {i["service"]["subject"] for i in imports} == api
    # share: the server puts the caller's user into Nats-Request-Info (what CLM's rate limits key on).
    assert all(i["share"] is True and i["service"]["account"] == "HAPKI" for i in imports)
    with pytest.raises(ValueError):
        accounts_conf([User("x", "root", _HASH)])


def test_accounts_conf_takes_bcrypt_hashes_only() -> None:
    password = 'pa"ss' * 5
    hashed = hash_password(password)
    # bcrypt's cheapest cost: nats-server pays it on every connection, and bus passwords are random (128+ bits).
    assert hashed.startswith("$2a$04$") and bcrypt.checkpw(password.encode(), hashed.encode())
    assert hash_password(password) != hashed  # salted
    accounts_conf([User("client", "client", hashed)])
    # A plaintext password, even one that starts like a hash, or a truncated hash: refused, and not echoed.
    for value in ("s3cret-plaintext", "$2a$10$short", hashed[:-1], hashed + "x", "$2q$10$" + hashed[7:]):
        with pytest.raises(ValueError, match="not a bcrypt hash") as refused:
            accounts_conf([User("client", "client", value)])
        assert value not in str(refused.value)


def test_a_password_too_short_to_be_random_is_not_hashed() -> None:
    """The cheap cost is safe only because bus passwords cannot be guessed; a short one is refused, not echoed."""
    with pytest.raises(ValueError, match=f"at least {MIN_PASSWORD_CHARS} characters") as refused:
        hash_password("s3cret")
    assert "s3cret" not in str(refused.value)
    assert hash_password("x" * MIN_PASSWORD_CHARS).startswith("$2a$04$")
