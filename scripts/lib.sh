# Shared by scripts/ensure-*.sh: logging and installing Debian packages (needs root).
# The caller sets LOG_TAG before sourcing.
log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() { printf '[%s] FATAL: %s\n' "$LOG_TAG" "$*" >&2; exit 1; }

apt_install() {
  [ "$(id -u)" = 0 ] || die "$* missing and not root: install it (apt-get install $*) or start it yourself"
  command -v apt-get >/dev/null || die "$* missing and apt-get is not available"
  log "installing $* from Debian packages"
  if [ -z "${CHARTLINE_APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
    export CHARTLINE_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}
