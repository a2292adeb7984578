#!/usr/bin/env bash
# `make soak`: the load and fault suite (issue #10). Builds the release binary, then runs
# `chartline soak` (services/chartline/src/soak_cmd.rs): the distributed deployment under
# load while a chaos driver kills services, restarts nats-server and PostgreSQL and
# injects EHR faults; it prints its figures and exits non-zero when an invariant fails.
#
# Loopback only. PostgreSQL: by default a private cluster (initdb under $SOAK_PG_DIR on
# 127.0.0.1:$SOAK_PG_PORT, same binaries as the system's), so restarting it (pg_ctl -m
# immediate restart: a crash plus recovery) does not disturb anyone else using the shared
# 127.0.0.1:5432. SOAK_SHARED_PG=1 uses the shared cluster and restarts it with
# pg_ctlcluster instead. nats-server: the soak starts and restarts its own (free port).
#
# Knobs: SOAK_SECS (default 300), SOAK_RATE (commands/s, 40), SOAK_CHAOS_INTERVAL (s, 20),
# SOAK_SEED, SOAK_BIN; extra arguments go to `chartline soak` (see `chartline soak --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[soak] %s\n' "$*" >&2; }

# SOAK_BIN=target/debug/chartline skips the release build (trying the harness itself).
BIN=${SOAK_BIN:-target/release/chartline}
[ -n "${SOAK_BIN:-}" ] || cargo build --release -p chartline

if [ -n "${SOAK_SHARED_PG:-}" ]; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  export SOAK_PG_URL=${SOAK_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
  export SOAK_PG_RESTART=${SOAK_PG_RESTART:-"pg_ctlcluster $version main restart"}
else
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -x "$PG_BIN/initdb" ] || { log "FATAL: no PostgreSQL binaries under /usr/lib/postgresql (make services installs them)"; exit 1; }
  PG_DIR=${SOAK_PG_DIR:-/tmp/chartline-soak-pg}
  PG_PORT=${SOAK_PG_PORT:-55432}
  AS_PG=()
  [ "$(id -u)" != 0 ] || AS_PG=(runuser -u postgres --)
  pg_ctl() { "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR" "$@"; }
  if [ -f "$PG_DIR/postmaster.pid" ]; then pg_ctl -m immediate stop >/dev/null 2>&1 || true; fi
  rm -rf "$PG_DIR"
  mkdir -p "$PG_DIR"
  [ "$(id -u)" != 0 ] || chown postgres:postgres "$PG_DIR"
  "${AS_PG[@]}" "$PG_BIN/initdb" -D "$PG_DIR" -U postgres --auth=trust -E UTF8 >/dev/null
  OPTS="-p $PG_PORT -c listen_addresses=127.0.0.1 -k $PG_DIR -c max_connections=200"
  pg_ctl -l "$PG_DIR/server.log" -o "$OPTS" -w start >/dev/null
  cleanup() { pg_ctl -m fast -w stop >/dev/null 2>&1 || true; rm -rf "$PG_DIR"; }
  trap cleanup EXIT
  log "private PostgreSQL on 127.0.0.1:$PG_PORT ($PG_DIR)"
  export SOAK_PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  # Restart = crash (immediate stop, no checkpoint) + start with recovery.
  export SOAK_PG_RESTART="${AS_PG[*]} $PG_BIN/pg_ctl -D $PG_DIR -l $PG_DIR/server.log -m immediate -w restart"
fi

status=0
# The soak's own log: errors only (its database pools see every PostgreSQL restart).
CHARTLINE_LOG=${CHARTLINE_LOG:-error} "$BIN" soak "$@" || status=$?
exit "$status"
