"""The profiles file: the shipped one loads, and bad configuration stops at load time with a clear ValueError."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from hapki.runtime.profiles import SHIPPED_PROFILES_PATH, Profile, load_profiles, parse_profiles

MINIMAL = """
[profiles.web]
description = "test profile"
validity_seconds = 86400
key_usage = ["digital_signature"]
extended_key_usage = ["server_auth"]
allowed_name_forms = ["dns"]
allow_wildcard = false
allowed_domains = ["example.com"]
max_sans = 5
require_san = true
ec_curves = ["secp256r1"]
allow_rsa = false
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    return path


def shipped_table(name: str) -> dict:
    with open(SHIPPED_PROFILES_PATH, "rb") as file:
        return tomllib.load(file)["profiles"][name]


def test_shipped_profiles_load() -> None:
    profiles = load_profiles(SHIPPED_PROFILES_PATH)
    assert {"tls-server", "tls-client"} <= profiles.keys()

    server = profiles["tls-server"]
    assert server.name == "tls-server"
    assert server.validity_seconds == 90 * 86400
    assert server.key_usage == ["digital_signature"]
    assert server.rsa_key_usage == ["key_encipherment"]
    assert server.extended_key_usage == ["server_auth"]
    assert set(server.allowed_name_forms) == {"dns", "ip"}
    assert server.allow_wildcard
    assert "example.com" in server.allowed_domains
    assert server.ip_networks

    client = profiles["tls-client"]
    assert client.validity_seconds == 30 * 86400
    assert client.extended_key_usage == ["client_auth"]
    assert set(client.allowed_name_forms) == {"dns", "email"}
    assert not client.allow_wildcard
    assert client.allowed_ip_networks == []


def test_shipped_file_is_package_data() -> None:
    assert SHIPPED_PROFILES_PATH.name == "profiles.toml"
    assert SHIPPED_PROFILES_PATH.parent.name == "runtime"


def test_minimal_profile_loads(tmp_path: Path) -> None:
    profile = load_profiles(write(tmp_path, MINIMAL))["web"]
    assert profile.rsa_min_bits == 2048 and profile.rsa_max_bits == 8192  # defaults
    assert profile.rsa_key_usage == [] and profile.ec_key_usage == []


def test_unknown_field_in_a_profile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"profile 'web': .*validity_days.*(Extra|extra)"):
        load_profiles(write(tmp_path, MINIMAL + "validity_days = 3\n"))


def test_unknown_top_level_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="defaults"):
        load_profiles(write(tmp_path, "[defaults]\nx = 1\n" + MINIMAL))


def test_name_inside_the_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the key is the name"):
        load_profiles(write(tmp_path, MINIMAL + 'name = "other"\n'))


def test_missing_field_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_sans"):
        load_profiles(write(tmp_path, MINIMAL.replace("max_sans = 5\n", "")))


def test_unreadable_or_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_profiles(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_profiles(write(tmp_path, "[profiles.web\n"))
    with pytest.raises(ValueError, match="profiles"):
        load_profiles(write(tmp_path, ""))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"validity_seconds": 0}, "validity_seconds"),
        ({"validity_seconds": 399 * 86400}, "validity_seconds"),
        ({"key_usage": ["key_cert_sign"]}, "key_usage"),  # never a CA certificate
        ({"key_usage": ["key_encipherment"]}, "key_usage"),  # RSA-only bit: belongs in rsa_key_usage
        ({"key_usage": ["digital_signature", "digital_signature"]}, "duplicate"),
        ({"extended_key_usage": ["code_signing"]}, "extended_key_usage"),
        ({"extended_key_usage": []}, "extended_key_usage"),
        ({"allowed_name_forms": ["uri"]}, "allowed_name_forms"),
        ({"allowed_domains": ["Example.com"]}, "lowercase"),
        ({"allowed_domains": ["*.example.com"]}, "allowed_domains"),
        ({"allowed_domains": ["exa mple.com"]}, "allowed_domains"),
        ({"allowed_name_forms": ["dns", "ip"]}, "allowed_ip_networks is empty"),
        ({"allowed_ip_networks": ["10.0.0.0/8"]}, "'ip' is not an allowed name form"),
        ({"allowed_name_forms": ["dns", "ip"], "allowed_ip_networks": ["10.0.0.1/8"]}, "host bits"),
        ({"allowed_name_forms": ["dns", "ip"], "allowed_ip_networks": ["nonsense"]}, "nonsense"),
        ({"allowed_name_forms": ["email"], "allow_wildcard": True}, "allow_wildcard"),
        ({"max_sans": 0}, "max_sans"),
        ({"max_sans": 101}, "max_sans"),
        ({"ec_curves": ["secp521r1"]}, "ec_curves"),
        ({"ec_curves": []}, "no key type allowed"),
        ({"allow_rsa": True, "rsa_min_bits": 1024}, "rsa_min_bits"),
        ({"allow_rsa": True, "rsa_max_bits": 16384}, "rsa_max_bits"),
        ({"allow_rsa": True, "rsa_min_bits": 4096, "rsa_max_bits": 3072}, "larger than"),
        ({"validity_seconds": "90d"}, "validity_seconds"),
    ],
)
def test_bad_profile_settings_are_refused(change: dict, message: str) -> None:
    table = tomllib.loads(MINIMAL)["profiles"]["web"] | change
    with pytest.raises(ValueError, match=message):
        parse_profiles({"profiles": {"web": table}})


def test_bad_profile_name_is_refused() -> None:
    table = tomllib.loads(MINIMAL)["profiles"]["web"]
    with pytest.raises(ValueError, match="name"):
        parse_profiles({"profiles": {"Web Server": table}})


def test_profile_is_frozen() -> None:
    profile = Profile.model_validate({**shipped_table("tls-client"), "name": "tls-client"})
    with pytest.raises(ValueError):
        profile.max_sans = 1  # type: ignore[misc]
