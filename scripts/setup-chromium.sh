#!/usr/bin/env bash
# Installs a headless browser for the status page test (tests/e2e/test_status_page.py):
# Debian's `chromium` package, when no `chromium` is on PATH, with the fonts it renders text in.
#
# The test drives it over the DevTools protocol on a pipe (--remote-debugging-pipe), so nothing
# else is needed: no Node package, no driver, no browser build downloaded at run time.
#
# Idempotent: does nothing when `chromium` is already on PATH. Installing needs root; on a
# machine without apt, put a Chromium (or Chrome) binary on PATH as `chromium` yourself.
set -euo pipefail

log() { printf 'setup-chromium: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

if command -v chromium >/dev/null; then
  log "using $(command -v chromium) ($(chromium --version 2>/dev/null | head -n 1))"
  exit 0
fi
[ "$(id -u)" = 0 ] || die "need root to install Debian's chromium package; put a chromium binary on PATH yourself, then run this again"
command -v apt-get >/dev/null || die "no apt-get: put a chromium binary on PATH yourself, then run this again"
log "installing Debian packages: chromium fonts-dejavu-core"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# without Recommends: no desktop integration, no extra fonts beyond DejaVu
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
log "installed $(chromium --version 2>/dev/null | head -n 1)"
