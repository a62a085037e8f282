#!/bin/sh
# Healthy = this Galera node is Synced and ready (wsrep_ready=ON): what joiners and the provisioner wait for.
# Logs in as the OS user mysql over the socket (unix_socket authentication; no password).
set -eu
status=$(mariadb --no-defaults --socket="${GALERA_SOCKET:-/run/mysqld/mysqld.sock}" --batch --skip-column-names \
  --connect-timeout=3 -e "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_local_state_comment')")
printf '%s\n' "$status" | grep -q "^wsrep_ready[[:space:]]ON$"
printf '%s\n' "$status" | grep -q "^wsrep_local_state_comment[[:space:]]Synced$"
