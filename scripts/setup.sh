#!/usr/bin/env bash
# Prepare this host for the tests, the demo and the benchmark: Debian packages and the project's .venv.
# Idempotent: a second run installs nothing and takes about a second. Runs as root (or with sudo for apt).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }

# Debian packages the lab starts for real (MariaDB/Galera, SoftHSM2, keepalived, haproxy, nftables, ...).
# stunnel4: Galera's rsync SST runs through it (TLS); without it a joiner's SST fails rather than go plaintext.
packages=(
  mariadb-server mariadb-client galera-4 softhsm2 opensc openssl rsync stunnel4 iproute2 nftables keepalived haproxy
  make curl
  python3 python3-venv
  golang-cfssl  # the peer CA of `hapki bench --compare`
  prometheus    # the HA lab's Prometheus (hapki.lab.prometheus)
)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=()
for pkg in "${packages[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done

if ((${#missing[@]})); then
  sudo=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null || { say "need root to install: ${missing[*]}"; exit 1; }
    sudo=(sudo)
  fi
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's postinst starts system services; the lab runs its own instances on private ports, so a system
  # MariaDB on 3306 (and a stray haproxy, a system Prometheus on 9090) only costs memory and confuses anyone who
  # connects to the default port.
  for unit in mariadb haproxy prometheus; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$unit" 2>/dev/null; then
      say "stopping and disabling the system $unit service"
      "${sudo[@]}" systemctl stop "$unit" || true
      "${sudo[@]}" systemctl disable --quiet "$unit" || true
    fi
  done
else
  say "Debian packages present"
fi

if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  python3 -m venv .venv
fi

# Re-install only when pyproject.toml changed (editable install: code changes need no re-install).
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-64)"
if [[ -e $stamp ]]; then
  say "python packages up to date"
else
  say "installing python packages into .venv"
  .venv/bin/python -m pip install -q -e '.[test,profile]'
  # The fuzzer (atheris) is optional: where no wheel exists for this Python, `hapki fuzz` uses its own mutator.
  .venv/bin/python -m pip install -q -e '.[test,profile,fuzz]' || say "atheris not installed: hapki fuzz uses --engine random"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
say "done"
