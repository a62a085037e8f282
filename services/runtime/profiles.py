"""Certificate profiles: what CLM may approve for each kind of certificate, loaded from a strict TOML file.

The file has one table per profile, keyed by the profile's name:

    [profiles.tls-server]
    description = "..."
    validity_seconds = 7776000
    ...

Unknown keys, missing keys, wrong types and contradictory settings are refused at load time with a
ValueError that names the profile and the field, so a bad file stops the service at start, not at the first
request.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hapki.runtime.names import IPNetwork, normalize_dns_name
from hapki.contracts.errors import InvalidName

# The profiles file shipped with the package (the development defaults).
SHIPPED_PROFILES_PATH = Path(__file__).with_name("profiles.toml")

# The CA/B Forum ceiling for TLS certificates; SignCertificate refuses anything longer.
MAX_VALIDITY_SECONDS = 398 * 86400
# SignCertificate caps each name list at 100.
MAX_SANS_LIMIT = 100
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192

NameForm = Literal["dns", "ip", "email"]
EcCurve = Literal["secp256r1", "secp384r1"]
# Bits valid for every key type. keyCertSign and cRLSign are absent on purpose: CLM never approves CA certs.
CommonKeyUsage = Literal["digital_signature", "content_commitment"]
# keyEncipherment / dataEncipherment only mean something for RSA keys (RFC 5480 3 forbids them for EC keys).
RsaKeyUsage = Literal["key_encipherment", "data_encipherment"]
# keyAgreement (ECDH) only means something for EC keys.
EcKeyUsage = Literal["key_agreement"]
ExtendedKeyUsage = Literal["server_auth", "client_auth"]
ProfileName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]


def _unique(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError("duplicate entries")
    return values


class Profile(BaseModel):
    """One certificate profile: validity, usages, which names and which keys CLM approves under it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ProfileName = Field(description="Profile name, the key of its [profiles.<name>] table; no unit")
    description: str = Field(min_length=1, max_length=500, description="What the profile is for, for humans")
    validity_seconds: int = Field(
        gt=0, le=MAX_VALIDITY_SECONDS, description="Lifetime of issued certificates, in seconds (at most 398 days)"
    )
    key_usage: list[CommonKeyUsage] = Field(
        min_length=1,
        description="KeyUsage bits for every key type, by cryptography's attribute names (digital_signature, "
        "content_commitment); no unit",
    )
    rsa_key_usage: list[RsaKeyUsage] = Field(
        default_factory=list,
        description="KeyUsage bits added only when the key is RSA (key_encipherment for TLS 1.2 RSA key "
        "transport, data_encipherment); never set on EC keys; no unit",
    )
    ec_key_usage: list[EcKeyUsage] = Field(
        default_factory=list, description="KeyUsage bits added only when the key is EC (key_agreement); no unit"
    )
    extended_key_usage: list[ExtendedKeyUsage] = Field(
        min_length=1, description="Extended key usages by name: server_auth, client_auth; no unit"
    )
    allowed_name_forms: list[NameForm] = Field(
        min_length=1, description="Which SAN forms a request may carry: dns, ip, email; no unit"
    )
    allow_wildcard: bool = Field(description="Whether a DNS name may be a wildcard `*.<domain>` (leftmost label)")
    allowed_domains: list[str] = Field(
        description="DNS names and email domains must equal one of these or be a subdomain of one; an empty "
        "list allows any domain; lowercase A-label names, no wildcards"
    )
    allowed_ip_networks: list[str] = Field(
        default_factory=list,
        description="IP SANs must fall in one of these CIDR networks (IPv4 or IPv6). Required (non-empty) when "
        "'ip' is an allowed form, refused otherwise: write 0.0.0.0/0 and ::/0 to allow every address",
    )
    max_sans: int = Field(
        ge=1, le=MAX_SANS_LIMIT, description="Most distinct names (DNS + IP + email, CN included) per certificate"
    )
    require_san: bool = Field(
        description="Refuse a CSR without a subjectAltName extension (a subject CN alone is then not enough)"
    )
    ec_curves: list[EcCurve] = Field(
        description="EC curves accepted for the subject key: secp256r1, secp384r1; empty refuses EC keys"
    )
    allow_rsa: bool = Field(description="Whether RSA subject keys are accepted (public exponent must be 65537)")
    rsa_min_bits: int = Field(
        default=RSA_MIN_BITS, ge=RSA_MIN_BITS, le=RSA_MAX_BITS, description="Smallest RSA modulus accepted, bits"
    )
    rsa_max_bits: int = Field(
        default=RSA_MAX_BITS, ge=RSA_MIN_BITS, le=RSA_MAX_BITS, description="Largest RSA modulus accepted, bits"
    )

    _unique_lists = field_validator(
        "key_usage",
        "rsa_key_usage",
        "ec_key_usage",
        "extended_key_usage",
        "allowed_name_forms",
        "allowed_domains",
        "allowed_ip_networks",
        "ec_curves",
    )(_unique)

    @field_validator("allowed_domains")
    @classmethod
    def _domains_are_normalised(cls, domains: list[str]) -> list[str]:
        for domain in domains:
            try:
                normalised = normalize_dns_name(domain, allow_wildcard_syntax=False)
            except InvalidName as exc:
                raise ValueError(f"{domain!r}: {exc.details['reason']}") from None
            if normalised != domain:
                raise ValueError(f"{domain!r} must be written in lowercase")
        return domains

    @field_validator("allowed_ip_networks")
    @classmethod
    def _networks_parse(cls, networks: list[str]) -> list[str]:
        for network in networks:
            try:
                # strict: "10.0.0.1/8" is a typo for a host or a network; make the operator say which.
                ipaddress.ip_network(network, strict=True)
            except ValueError as exc:
                raise ValueError(f"{network!r}: {exc}") from None
        return networks

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if not self.ec_curves and not self.allow_rsa:
            raise ValueError("no key type allowed: set ec_curves and/or allow_rsa")
        if self.rsa_min_bits > self.rsa_max_bits:
            raise ValueError("rsa_min_bits is larger than rsa_max_bits")
        if "ip" in self.allowed_name_forms and not self.allowed_ip_networks:
            raise ValueError("'ip' is an allowed name form but allowed_ip_networks is empty")
        if "ip" not in self.allowed_name_forms and self.allowed_ip_networks:
            raise ValueError("allowed_ip_networks is set but 'ip' is not an allowed name form")
        if self.allow_wildcard and "dns" not in self.allowed_name_forms:
            raise ValueError("allow_wildcard is set but 'dns' is not an allowed name form")
        return self

    @cached_property
    def ip_networks(self) -> tuple[IPNetwork, ...]:
        """The allowed IP networks, parsed."""
        return tuple(ipaddress.ip_network(network) for network in self.allowed_ip_networks)


class _ProfilesFile(BaseModel):
    """The whole profiles file: only a `profiles` table of tables."""

    model_config = ConfigDict(extra="forbid")

    profiles: dict[str, dict] = Field(min_length=1, description="Profile tables keyed by profile name")


def load_profiles(path: str | os.PathLike[str]) -> dict[str, Profile]:
    """Read and validate a profiles TOML file; return the profiles by name. Raises ValueError on bad config."""
    try:
        with open(path, "rb") as file:
            raw = tomllib.load(file)
    except OSError as exc:
        raise ValueError(f"cannot read profiles file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"profiles file {path} is not valid TOML: {exc}") from None
    return parse_profiles(raw, source=str(path))


def parse_profiles(raw: dict, *, source: str = "<profiles>") -> dict[str, Profile]:
    """Validate already-parsed profiles data (the TOML document as a dict). Raises ValueError on bad config."""
    try:
        tables = _ProfilesFile.model_validate(raw).profiles
    except ValidationError as exc:
        raise ValueError(f"{source}: {_describe(exc)}") from None
    profiles: dict[str, Profile] = {}
    for name, table in tables.items():
        # The table key is the name; a `name` key inside the table would be a second, possibly different, one.
        if "name" in table:
            raise ValueError(f"{source}: profile {name!r}: do not set 'name' inside the table, the key is the name")
        try:
            profiles[name] = Profile.model_validate({**table, "name": name})
        except ValidationError as exc:
            raise ValueError(f"{source}: profile {name!r}: {_describe(exc)}") from None
    return profiles


def _describe(exc: ValidationError) -> str:
    """One line per problem: `field.path: message`."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or '<root>'}: {error['msg']}" for error in exc.errors()
    )
