#!/usr/bin/env bash
# Installs what the subscription and dashboard tests drive the API with: Node.js and
# npm, Debian's Chromium, and tests/browser's npm packages (graphql-ws, ws,
# playwright-core) exactly as pinned in tests/browser/package-lock.json.
# Idempotent; fails loudly, never skips.
set -euo pipefail

LOG_TAG=ensure-browser
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

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
