#!/bin/sh
# Start one Galera node of the Compose demo. GALERA_BOOTSTRAP=1 on db-1 only (compose/docker-compose.yml).
#
#   empty datadir, bootstrap node:  initialise it, start a new cluster (--wsrep-new-cluster)
#   empty datadir, joiner:          start; the data arrives by state transfer (rsync SST) from a running node
#   existing datadir:               join the running cluster; the bootstrap node starts a new one only when its
#                                   grastate.dat says safe_to_bootstrap: 1 (it was the last to leave, e.g. after
#                                   `docker compose down`, which stops db-1 last)
# After a crash of all three nodes, follow FIELD-NOTES: the highest seqno bootstraps (set safe_to_bootstrap: 1
# in its grastate.dat); `hapki lab` does this automatically, the demo leaves it to the operator.
set -eu
# (The paths are the image's; tests/integration/test_compose_galera.py runs this script on the host with its own.)
cnf=${GALERA_CNF:-/etc/mysql/hapki/galera.cnf}
datadir=${GALERA_DATADIR:-/var/lib/mysql}
bootstrap=${GALERA_BOOTSTRAP:-0}

if [ ! -d "$datadir/mysql" ]; then
  if [ "$bootstrap" = 1 ]; then
    # Runs as mysql already (no --user: that needs root). Root and the OS user mysql (the health check) may log
    # in over the socket only (unix_socket authentication), without a password.
    mariadb-install-db --defaults-file="$cnf" --auth-root-authentication-method=socket \
      --auth-root-socket-user=mysql --skip-test-db >/dev/null
    exec mariadbd --defaults-file="$cnf" --wsrep-new-cluster
  fi
  exec mariadbd --defaults-file="$cnf"
fi
if [ "$bootstrap" = 1 ] && grep -q '^safe_to_bootstrap: *1' "$datadir/grastate.dat" 2>/dev/null; then
  exec mariadbd --defaults-file="$cnf" --wsrep-new-cluster
fi
exec mariadbd --defaults-file="$cnf"
