#!/usr/bin/env bash
# Brings up what the test suite talks to: PostgreSQL on 127.0.0.1:5432 (user postgres,
# trust auth, database "test") and NATS with JetStream on 127.0.0.1:4222.
# Idempotent: reachable services are left alone; stopped ones are started; missing
# ones are installed from Debian packages (needs root). Fails loudly, never skips.
set -euo pipefail

PG_PORT=5432
NATS_PORT=4222
LOG_TAG=ensure-services
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 60); do
    port_open "$port" && return 0
    sleep 0.5
  done
  die "$name did not open 127.0.0.1:$port within 30 s"
}

psql_pg() { psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }

ensure_postgres() {
  if ! port_open "$PG_PORT"; then
    if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
      apt_install postgresql
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    [ -n "$version" ] || die "no PostgreSQL cluster under /etc/postgresql"
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    # The suite connects as postgres without a password over TCP on loopback only.
    if [ -f "$hba" ] && ! grep -q '^host all postgres 127.0.0.1/32 trust' "$hba"; then
      log "allowing trust auth for postgres on 127.0.0.1 in $hba"
      sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
    fi
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
      || pg_ctlcluster "$version" main start \
      || die "could not start PostgreSQL $version"
    wait_port "$PG_PORT" PostgreSQL
  fi
  command -v psql >/dev/null || apt_install postgresql-client
  for _ in $(seq 1 40); do
    psql_pg -d postgres -c 'select 1' >/dev/null 2>&1 && break
    sleep 0.5
  done
  psql_pg -d postgres -c 'select 1' >/dev/null || die "PostgreSQL on 127.0.0.1:$PG_PORT refuses user postgres without password"
  if [ "$(psql_pg -d postgres -c "select 1 from pg_database where datname = 'test'")" != 1 ]; then
    log "creating database test"
    psql_pg -d postgres -c 'create database test' >/dev/null
  fi
  log "PostgreSQL ready on 127.0.0.1:$PG_PORT"
}

ensure_nats() {
  if ! port_open "$NATS_PORT"; then
    local bin
    bin=$(command -v nats-server || true)
    [ -n "$bin" ] || [ ! -x /usr/sbin/nats-server ] || bin=/usr/sbin/nats-server
    if [ -z "$bin" ]; then
      apt_install nats-server
      bin=$(command -v nats-server || echo /usr/sbin/nats-server)
    fi
    local store_dir=/var/lib/nats-server log_file=/var/log/nats-server.log
    if [ "$(id -u)" != 0 ]; then
      store_dir="${TMPDIR:-/tmp}/chartline-nats"; log_file="$store_dir/nats.log"
    fi
    mkdir -p "$store_dir"
    log "starting nats-server with JetStream"
    if command -v start-stop-daemon >/dev/null; then
      start-stop-daemon --start --oknodo --background --exec "$bin" -- \
        -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$store_dir" -l "$log_file"
    else
      nohup "$bin" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$store_dir" -l "$log_file" >/dev/null 2>&1 &
    fi
    wait_port "$NATS_PORT" nats-server
  fi
  # JetStream must be on: the INFO line a server sends on connect says so.
  local info
  info=$(timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT; IFS= read -r line <&3; printf '%s' \"\$line\"" 2>/dev/null || true)
  case "$info" in
    INFO*'"jetstream":true'*) ;;
    INFO*) die "NATS on 127.0.0.1:$NATS_PORT runs without JetStream: restart it with -js" ;;
    *) die "127.0.0.1:$NATS_PORT does not speak NATS" ;;
  esac
  log "NATS with JetStream ready on 127.0.0.1:$NATS_PORT"
}

ensure_postgres
ensure_nats
