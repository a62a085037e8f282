"""Syntax, normalisation and policy rules for the names CLM puts in a certificate: DNS names, IPs, emails.

`approve_names` applies them to a CSR's subject and SANs. Every function is pure and linear in the size of
its input. Syntax problems raise InvalidName; well-formed names a profile does not allow raise ForbiddenName.
Both carry `details` = {"name": ..., "reason": ...}, and "field" (san.dns, subject.CN, ...) when known.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.x509.oid import NameOID

from hapki.contracts.errors import ForbiddenName, InvalidName

if TYPE_CHECKING:  # profiles imports this module's syntax rules
    from hapki.runtime.profiles import Profile

MAX_DNS_NAME_LENGTH = 253  # RFC 1035, without the trailing dot
MAX_LABEL_LENGTH = 63
MAX_EMAIL_LENGTH = 254  # RFC 5321 path limit minus the angle brackets
MAX_EMAIL_LOCAL_LENGTH = 64
DETAIL_CHARS = 256  # how much of an offending value an error echoes back

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# RFC 5322 dot-atom: atoms of atext separated by single dots (quoted local parts are refused on purpose).
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def _invalid(name: str, reason: str) -> InvalidName:
    return InvalidName(f"invalid name {name!r}: {reason}", {"name": name, "reason": reason})


def _forbidden(name: str, reason: str) -> ForbiddenName:
    return ForbiddenName(f"name {name!r} not allowed: {reason}", {"name": name, "reason": reason})


def _check_a_label(name: str, label: str) -> None:
    """Refuse an `xn--` label that is not valid punycode, and other reserved `??--` labels (RFC 5891 4.2.3.1)."""
    if label[2:4] != "--":
        return
    if not label.startswith("xn--"):
        raise _invalid(name, f"label {label!r} has '--' in positions 3-4 but is not an A-label")
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
    except UnicodeError:
        raise _invalid(name, f"label {label!r} is not valid punycode") from None
    # An A-label must encode something non-ASCII; "xn--abc-" style labels that decode to ASCII are fakes.
    if not decoded or decoded.isascii():
        raise _invalid(name, f"label {label!r} is not a valid A-label")


def normalize_dns_name(raw: str, *, allow_wildcard_syntax: bool = True) -> str:
    """Return the lowercase form of a DNS name, or raise InvalidName if its syntax is wrong.

    Accepts LDH labels of 1..63 octets, total length <= 253, A-labels only (U-labels and any non-ASCII are
    refused), and `*` only as the whole leftmost label. Whether a wildcard is *allowed* is policy, checked in
    `check_dns_policy`; `allow_wildcard_syntax=False` refuses it here as syntax (used for email domains).
    """
    if not raw:
        raise _invalid(raw, "empty DNS name")
    # Length first, so a huge input is refused before any per-label work.
    if len(raw) > MAX_DNS_NAME_LENGTH:
        raise _invalid(raw[:MAX_DNS_NAME_LENGTH] + "...", f"longer than {MAX_DNS_NAME_LENGTH} characters")
    if not raw.isascii():
        raise _invalid(raw, "non-ASCII characters: use A-labels (xn--...)")
    name = raw.lower()
    if name.endswith("."):
        raise _invalid(raw, "trailing dot")
    labels = name.split(".")
    for index, label in enumerate(labels):
        if label == "*":
            if index != 0 or not allow_wildcard_syntax:
                raise _invalid(raw, "'*' is only allowed as the whole leftmost label")
            if len(labels) == 1:
                raise _invalid(raw, "a wildcard needs a base domain")
            continue
        if not label:
            raise _invalid(raw, "empty label")
        if len(label) > MAX_LABEL_LENGTH:
            raise _invalid(raw, f"label longer than {MAX_LABEL_LENGTH} characters")
        if not _LDH_LABEL.fullmatch(label):
            raise _invalid(raw, f"label {label!r} is not letters, digits and inner hyphens")
        _check_a_label(raw, label)
    # An all-numeric last label makes the name look like an IPv4 address (RFC 3696 2); no TLD is numeric.
    if labels[-1].isdigit():
        raise _invalid(raw, "the last label is all digits")
    return name


def normalize_email(raw: str) -> str:
    """Return an email address with its domain lowercased, or raise InvalidName.

    Basic syntax only: one `@`, a dot-atom local part of 1..64 characters (case kept: it is the mailbox
    owner's to interpret), and a DNS domain with the same rules as DNS names but no wildcard.
    """
    if len(raw) > MAX_EMAIL_LENGTH:
        raise _invalid(raw[:MAX_EMAIL_LENGTH] + "...", f"email longer than {MAX_EMAIL_LENGTH} characters")
    if not raw.isascii():
        raise _invalid(raw, "non-ASCII email address")
    local, at, domain = raw.rpartition("@")
    if not at or not local:
        raise _invalid(raw, "email address needs local-part@domain")
    if len(local) > MAX_EMAIL_LOCAL_LENGTH:
        raise _invalid(raw, f"email local part longer than {MAX_EMAIL_LOCAL_LENGTH} characters")
    if not _EMAIL_LOCAL.fullmatch(local):
        raise _invalid(raw, "email local part is not a dot-atom")
    try:
        domain = normalize_dns_name(domain, allow_wildcard_syntax=False)
    except InvalidName as exc:
        raise _invalid(raw, f"email domain: {exc.details['reason']}") from None
    return f"{local}@{domain}"


def parse_ip(raw: str) -> IPAddress:
    """Parse an IPv4 or IPv6 address written as text (no zone id, no prefix), or raise InvalidName."""
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        raise _invalid(raw, "not an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise _invalid(raw, "IPv6 zone ids are not allowed")
    return address


def _under(name: str, domains: Collection[str]) -> bool:
    """True if `name` equals one of `domains` or is a subdomain of one. Linear in the labels of `name`."""
    candidate = name
    while True:
        if candidate in domains:
            return True
        _, dot, candidate = candidate.partition(".")
        if not dot:
            return False


def check_dns_policy(name: str, *, allow_wildcard: bool, allowed_domains: Collection[str]) -> None:
    """Raise ForbiddenName if the normalised DNS name `name` is not allowed by these rules.

    `allowed_domains` must hold normalised names; empty means any domain.
    """
    base = name
    if name.startswith("*."):
        if not allow_wildcard:
            raise _forbidden(name, "wildcard names are not allowed by this profile")
        base = name[2:]
        # Without a public suffix list the safe rule is structural: a wildcard must sit at least two labels
        # deep, so `*.com` or `*.internal` never cover a whole top-level domain. `*.co.uk` needs the profile's
        # allowed_domains to keep it out.
        if "." not in base:
            raise _forbidden(name, "a wildcard must not cover a whole top-level domain")
    if allowed_domains and not _under(base, allowed_domains):
        raise _forbidden(name, "not in or under an allowed domain")


def check_email_policy(email: str, *, allowed_domains: Collection[str]) -> None:
    """Raise ForbiddenName if the normalised email's domain is not in or under one of `allowed_domains`."""
    domain = email.rpartition("@")[2]
    if allowed_domains and not _under(domain, allowed_domains):
        raise _forbidden(email, "email domain not in or under an allowed domain")


def check_ip_policy(address: IPAddress, *, allowed_networks: Sequence[IPNetwork]) -> None:
    """Raise ForbiddenName if `address` is in none of `allowed_networks`."""
    if not any(address in network for network in allowed_networks):
        raise _forbidden(str(address), "not in an allowed IP network")


# --- collecting a CSR's names -----------------------------------------------------------------------------

MAX_CN_LENGTH = 64  # X.520 ub-common-name


@dataclass
class ApprovedNames:
    """Normalised names in first-seen order; dicts as ordered sets, so de-duplication is linear."""

    common_name: str | None = None
    dns: dict[str, None] = field(default_factory=dict)
    ips: dict[IPAddress, None] = field(default_factory=dict)
    emails: dict[str, None] = field(default_factory=dict)

    def count(self) -> int:
        """How many distinct names, of all forms."""
        return len(self.dns) + len(self.ips) + len(self.emails)


def _tagged(exc: InvalidName | ForbiddenName, where: str) -> InvalidName | ForbiddenName:
    """Add where in the CSR the offending name came from (subject.CN, san.dns, ...) to the error's details."""
    exc.details = {"field": where, **exc.details}
    return exc


def _refused(name: object, reason: str, where: str) -> ForbiddenName:
    shown = None if name is None else str(name)[:DETAIL_CHARS]
    return ForbiddenName(f"name {shown!r} not allowed: {reason}", {"field": where, "name": shown, "reason": reason})


def _add(result: ApprovedNames, form: str, value: str | IPAddress, where: str, profile: Profile) -> str:
    """Normalise one name into `result` (syntax and allowed form); return its normalised text."""
    if form not in profile.allowed_name_forms:
        raise _refused(value, f"{form} names are not allowed by profile {profile.name!r}", where)
    try:
        if form == "dns":
            normal = normalize_dns_name(str(value))
            result.dns[normal] = None
            return normal
        if form == "email":
            normal = normalize_email(str(value))
            result.emails[normal] = None
            return normal
        address = value if not isinstance(value, str) else parse_ip(value)
        result.ips[address] = None
        return str(address)
    except InvalidName as exc:
        raise _tagged(exc, where) from None


def _cn_form(value: str) -> str:
    """Which kind of name a subject CN holds: an IP literal, an email address, or else a DNS name."""
    try:
        parse_ip(value)
    except InvalidName:
        return "email" if "@" in value else "dns"
    return "ip"


def approve_names(
    subject: Iterable[x509.NameAttribute], sans: Iterable[x509.GeneralName] | None, profile: Profile
) -> ApprovedNames:
    """Collect subject CN and SANs, check their syntax, then the profile's forms, domains, networks and count.

    `sans` is None when the CSR has no subjectAltName extension. A CN that is not among the SANs becomes
    one, under the same rules: the certificate's CN is always one of its SANs.
    """
    result = ApprovedNames()
    for general_name in sans or ():
        if isinstance(general_name, x509.DNSName):
            _add(result, "dns", general_name.value, "san.dns", profile)
        elif isinstance(general_name, x509.RFC822Name):
            _add(result, "email", general_name.value, "san.email", profile)
        elif isinstance(general_name, x509.IPAddress):
            if not isinstance(general_name.value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                # An address with a netmask is a name-constraints form, never a certificate's name.
                raise _tagged(_invalid(str(general_name.value), "a network, not an address"), "san.ip")
            _add(result, "ip", general_name.value, "san.ip", profile)
        else:
            kind = type(general_name).__name__
            raise _refused(general_name.value, f"subjectAltName type {kind} is not supported", f"san.{kind}")

    # Only one CN and nothing else: the CA writes a subject of exactly that CN, so anything more would be lost.
    common_names = []
    for attribute in subject:
        label = attribute.rfc4514_attribute_name
        if attribute.oid != NameOID.COMMON_NAME:
            reason = f"subject attribute {label} is not allowed, only CN"
            raise _refused(f"{label}={attribute.value!r}", reason, "subject")
        common_names.append(attribute.value)
    if len(common_names) > 1:
        raise _refused(common_names[1], "the subject has more than one CN", "subject.CN")
    if common_names:
        cn = common_names[0]
        if not isinstance(cn, str) or not 1 <= len(cn) <= MAX_CN_LENGTH:
            raise _tagged(_invalid(str(cn)[:DETAIL_CHARS], f"CN is not 1..{MAX_CN_LENGTH} characters"), "subject.CN")
        result.common_name = _add(result, _cn_form(cn), cn, "subject.CN", profile)

    if profile.require_san and sans is None:
        raise _refused(result.common_name, f"profile {profile.name!r} requires a subjectAltName extension", "csr_pem")
    if result.count() == 0:
        raise _refused(None, "the CSR names nothing: no subject CN and no subjectAltName", "csr_pem")
    if result.count() > profile.max_sans:
        error = _refused(None, f"{result.count()} names, profile {profile.name!r} allows {profile.max_sans}", "csr_pem")
        error.details.update(count=result.count(), limit=profile.max_sans)
        raise error

    # Policy last, over at most max_sans distinct names.
    domains = frozenset(profile.allowed_domains)
    where = "san.dns"
    try:
        for dns_name in result.dns:
            check_dns_policy(dns_name, allow_wildcard=profile.allow_wildcard, allowed_domains=domains)
        where = "san.email"
        for email in result.emails:
            check_email_policy(email, allowed_domains=domains)
        where = "san.ip"
        for address in result.ips:
            check_ip_policy(address, allowed_networks=profile.ip_networks)
    except ForbiddenName as exc:
        raise _tagged(exc, where) from None
    return result
