"""Bus authorization: the one table of who may publish and subscribe to what, rendered into nats-server config.

Every party connects with its own user (password from a 0600 file) and gets exactly its subjects (issue 6):

- clients, in an account of their own, call the CLM API subjects (imported from the services' account, so the
  server tells CLM which user asks: see accounts_conf) and read replies in their own inbox only (``_INBOX.<user>.>``, which the
  client sets as its inbox prefix), so one requester cannot read another's replies nor CARA's result events;
- CLM answers clients, publishes signing requests into the signing stream (the subject; JetStream acks to its
  inbox) and its events, and hears CARA's results; it cannot create a consumer on the signing stream, so it
  cannot read signing requests back;
- CARA (the signer) alone pulls from and acks on the signing stream's durable consumer, and alone publishes
  results;
- watchers alone publish HA events, each only its own member's (a user with a scope ``<tier>.<member>``);
- the admin (provisioning: streams and consumers; the lab's and the tests' inspection) may do everything.

The rendered config holds bcrypt hashes of the passwords only (nats-server accepts ``$2a$`` hashes in place of a
password): the services read their plaintext from their own 0600 password files, the server never has it on disk.

Stream and consumer definitions are created by the admin (hapki.runtime.bus.ensure_topology at provisioning);
services only look them up (``$JS.API.STREAM.INFO``), like database users that only check the schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import bcrypt

from hapki.contracts import subjects as s

__all__ = ["BCRYPT_COST", "CLIENTS_ACCOUNT", "MIN_PASSWORD_CHARS", "REQUEST_INFO_HEADER", "ROLES", "Permissions", "User",
           "accounts_conf", "hash_password", "inbox_prefix"]

# bcrypt's minimum. Its cost only slows guessing a password from its hash, and a bus password is at least 128 random
# bits (hapki makes 24 random bytes, 32 URL-safe characters), out of reach at any cost. nats-server pays the cost
# on every connection and reconnection, before it answers: at Go's default (10) about 60 ms of CPU and of the
# client's wait on these machines, at 4 about 1 ms (session 16). A CARA restart connects once per signer process,
# and a bus node's loss sends every client it had to the other servers at once.
BCRYPT_COST = 4
# 128 bits as URL-safe base64: a shorter password is refused rather than hashed at a cost that would not protect it.
MIN_PASSWORD_CHARS = 22
# What nats-server takes as a bcrypt hash rather than a plaintext password (server/auth.go, validBcryptPrefix).
_BCRYPT = re.compile(r"^\$2[abxy]\$\d{2}\$[./A-Za-z0-9]{53}$")

# Clients' own account: requests into the services' account carry the server's word on who sent them.
CLIENTS_ACCOUNT = "CLIENTS"
# The header nats-server sets on a request crossing a service import (JSON: "acc", "user" with share: true, ...).
REQUEST_INFO_HEADER = "Nats-Request-Info"

_JS = "$JS.API"
_CLM_API = (s.CLM_ISSUE, s.CLM_STATUS, s.CLM_CERTIFICATE, s.CLM_REVOKE, s.CLM_SEARCH, s.CLM_RENEW)
_INFO = f"{_JS}.STREAM.INFO"
_SIGNER = f"{s.SIGNING_STREAM}.{s.SIGNING_CONSUMER}"


@dataclass(frozen=True)
class Permissions:
    """Subjects one role may publish to and subscribe to; `respond`: may answer requests (allow_responses)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    respond: bool = False


def inbox_prefix(user: str) -> str:
    """The reply inbox prefix of `user`: only that user may subscribe below it."""
    return f"_INBOX.{user}"


ROLES: Mapping[str, Permissions] = {
    "client": Permissions(publish=_CLM_API, subscribe=()),
    "clm": Permissions(
        # Stream lookups: the streams it produces into (services check, the admin provisions).
        publish=(s.CARA_SIGN, s.CLM_EXPIRING, s.CLM_REVOKED, f"{_INFO}.{s.SIGNING_STREAM}", f"{_INFO}.{s.EXPIRY_STREAM}"),
        subscribe=(*_CLM_API, s.CARA_ISSUED, s.CARA_FAILED),
        respond=True,
    ),
    "cara": Permissions(
        publish=(s.CARA_ISSUED, s.CARA_FAILED, f"{_INFO}.{s.SIGNING_STREAM}",
                 f"{_JS}.CONSUMER.INFO.{_SIGNER}", f"{_JS}.CONSUMER.MSG.NEXT.{_SIGNER}",
                 # Converging the durable's settings (bus.ensure_topology): only this consumer, on this stream.
                 f"{_JS}.CONSUMER.CREATE.{_SIGNER}", f"{_JS}.CONSUMER.CREATE.{_SIGNER}.>",
                 f"{_JS}.CONSUMER.DURABLE.CREATE.{_SIGNER}",
                 f"$JS.ACK.{_SIGNER}.>"),
        subscribe=(s.CLM_REVOKED,),
    ),
    # {scope}: the user's own tier.member (User.scope); ">" for an unscoped watcher user.
    "watcher": Permissions(publish=(f"{s.HA_EVENTS_PREFIX}.{{scope}}", f"{_INFO}.{s.HA_EVENTS_STREAM}"), subscribe=()),
    "admin": Permissions(publish=(">",), subscribe=(">",), respond=True),
}


def hash_password(password: str, cost: int = BCRYPT_COST) -> str:
    """The bcrypt hash (``$2a$``, the form nats-server documents) of a bus password, for nats.conf.

    ValueError for a password under MIN_PASSWORD_CHARS characters: the cheap hash is safe for random ones only.
    """
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"a bus password needs at least {MIN_PASSWORD_CHARS} characters (128 random bits), "
                         f"got {len(password)}")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost, prefix=b"2a")).decode()


@dataclass(frozen=True)
class User:
    """One bus user: its name, role (a key of ROLES) and bcrypt password hash; `scope` fills {scope} in its
    subjects."""

    name: str
    role: str
    password_hash: str
    scope: str = ">"


def _user_block(user: User) -> dict[str, object]:
    perms = ROLES[user.role]
    subscribe = [*perms.subscribe]
    if user.role != "admin":
        subscribe.append(f"{inbox_prefix(user.name)}.>")
    block: dict[str, object] = {"user": user.name, "password": user.password_hash,
                                "permissions": {"publish": {"allow": [p.replace("{scope}", user.scope)
                                                                      for p in perms.publish]},
                                                "subscribe": {"allow": subscribe}}}
    if perms.respond and user.role != "admin":
        block["permissions"]["allow_responses"] = True  # type: ignore[index]
    return block


def accounts_conf(users: Sequence[User], *, account: str = "HAPKI", clients_account: str = CLIENTS_ACCOUNT) -> str:
    """The ``accounts`` block of nats.conf: the services' account with JetStream, and the clients' account.

    Clients (role ``client``) live in ``clients_account`` and reach CLM through a service import of the CLM API
    subjects with ``share: true``: for every request that crosses it, the server writes the caller's account and
    user into the ``Nats-Request-Info`` header, replacing any the client sent. That is how CLM learns who is
    asking (hapki.clm.app keys the rate limits on it); within one account NATS tells a responder nothing.
    JSON is valid nats-server config syntax, and quoting it this way leaves no room for injection through names.
    """
    for user in users:
        if user.role not in ROLES:
            raise ValueError(f"unknown bus role {user.role!r} for {user.name!r}")
        if not _BCRYPT.match(user.password_hash):  # never a plaintext password in the config (value not shown)
            raise ValueError(f"bus user {user.name!r}: password_hash is not a bcrypt hash (see hash_password)")
    services = [_user_block(u) for u in users if u.role != "client"]
    clients = [_user_block(u) for u in users if u.role == "client"]
    body: dict[str, object] = {account: {"jetstream": "enabled", "users": services,
                                         "exports": [{"service": subject} for subject in _CLM_API]}}
    if clients:
        body[clients_account] = {"users": clients, "imports": [
            {"service": {"account": account, "subject": subject}, "share": True} for subject in _CLM_API]}
    return "accounts: " + json.dumps(body, indent=2) + "\n"
