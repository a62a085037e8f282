#!/bin/bash
# One CARA or CLM member of the Compose demo: keepalived, haproxy and the service in one container, as in the
# lab's member namespace. Usage: hapki-member cara|clm (configs in /etc/hapki, rendered by `hapki compose render`).
#
# keepalived and haproxy run as root (see the Dockerfile); the service runs as the unprivileged user hapki. When
# any of the three exits, the others are stopped and the container exits non-zero, so Docker restarts the whole
# member (restart: unless-stopped): a member is whole or down, never a VIP holder without its service. The service
# runs under `--supervise`: if it dies unasked, its supervisor forks it again at once (hapki.runtime.supervise);
# only a crash loop (five children in a minute that died within 5 s of their start) ends the supervisor and so
# the member.
set -euo pipefail

service=${1:?usage: hapki-member cara|clm}
[[ $service == cara || $service == clm ]] || { echo "hapki-member: unknown service $service" >&2; exit 2; }

# -n foreground, -P VRRP only, -l -D -G: log to stdout with details, no syslog (as the lab starts it).
keepalived -n -P -l -D -G -f /etc/hapki/keepalived.conf -p /run/keepalived.pid -r /run/keepalived-vrrp.pid &
haproxy -c -q -f /etc/hapki/haproxy.cfg
haproxy -db -f /etc/hapki/haproxy.cfg &
setpriv --reuid=hapki --regid=hapki --init-groups \
  hapki serve "$service" --config "/etc/hapki/$service.toml" --supervise &

stop() { kill -TERM $(jobs -p) 2>/dev/null || true; }
trap stop TERM INT
status=0
wait -n || status=$?
stop
wait || true
echo "hapki-member: a process of $service exited (status $status); stopping the member" >&2
exit $(( status == 0 ? 1 : status ))
