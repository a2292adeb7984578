#!/usr/bin/env bash
# Installs what the subscription and dashboard tests drive the API with: Node.js and
# npm, Debian's Chromium, and tests/browser's npm packages (graphql-ws, ws,
# playwright-core) exactly as pinned in tests/browser/package-lock.json.
# Idempotent; fails loudly, never skips.
set -euo pipefail

log() { printf '[ensure-browser] %s\n' "$*" >&2; }
die() { printf '[ensure-browser] FATAL: %s\n' "$*" >&2; exit 1; }

apt_install() {
  [ "$(id -u)" = 0 ] || die "$* missing and not root: install it (apt-get install $*)"
  command -v apt-get >/dev/null || die "$* missing and apt-get is not available"
  log "installing $* from Debian packages"
  if [ -z "${CHARTLINE_APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
    export CHARTLINE_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

command -v node >/dev/null || apt_install nodejs
command -v npm >/dev/null || apt_install npm
command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || apt_install chromium
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)' \
  || die "Node.js >= 18 is needed (found $(node --version))"

dir="$(cd "$(dirname "$0")/../tests/browser" && pwd)"
stamp="$dir/node_modules/.chartline-lock"
if [ ! -f "$stamp" ] || ! cmp -s "$dir/package-lock.json" "$stamp"; then
  log "installing tests/browser npm packages (npm ci)"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci in tests/browser failed"
  cp "$dir/package-lock.json" "$stamp"
fi
log "node $(node --version), $(/usr/bin/chromium --version 2>/dev/null | head -1), tests/browser ready"
