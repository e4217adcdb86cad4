#!/usr/bin/env bash
# Installs a Prometheus server for the dashboard test (tests/e2e/test_prometheus_dashboard.py):
# Debian's `prometheus` package, when no `prometheus` is on PATH.
#
# The test starts its own Prometheus on a free port with a generated config. The Debian package
# also installs a system service (port 9090, scraping localhost:9100): it is stopped and
# disabled here, so that nothing runs that the test or a developer did not start. In a container
# whose /usr/sbin/policy-rc.d forbids starting services (Debian's Docker images), the package
# starts nothing in the first place.
#
# Idempotent: does nothing when `prometheus` is already on PATH. Installing needs root; on a
# machine without apt, put a Prometheus 2.x binary on PATH yourself.
set -euo pipefail

log() { printf 'setup-prometheus: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

if command -v prometheus >/dev/null; then
  log "using $(command -v prometheus) ($(prometheus --version 2>&1 | head -n 1))"
  exit 0
fi
[ "$(id -u)" = 0 ] || die "need root to install Debian's prometheus package; put a prometheus binary on PATH yourself, then run this again"
command -v apt-get >/dev/null || die "no apt-get: put a prometheus binary on PATH yourself, then run this again"
log "installing Debian package: prometheus"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# without Recommends: no node exporter service either
apt-get install -y -qq --no-install-recommends prometheus >/dev/null

# The package's service must not hold a port or scrape anything: the test runs its own.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  systemctl disable --now prometheus.service >/dev/null 2>&1 || true
elif [ -x /etc/init.d/prometheus ]; then
  /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  command -v update-rc.d >/dev/null && update-rc.d prometheus disable >/dev/null 2>&1 || true
fi
log "installed $(prometheus --version 2>&1 | head -n 1)"
