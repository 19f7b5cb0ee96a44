#!/usr/bin/env bash
# System packages the tests use: Debian's prometheus (promtool + a real Prometheus for the
# dashboard check). Installs only when missing and when apt-get can run. Under CI (CI=true),
# where every test must run, a failed install fails setup; elsewhere it warns and the tests
# that need it skip, naming the package.
set -u
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
case "${CI:-}" in 1|true|TRUE|True|yes) ci=1 ;; *) ci=0 ;; esac
fail() {
  if [ "$ci" = 1 ]; then
    echo "error: $1 (CI=true: the tests that need it would fail)" >&2
    exit 1
  fi
  echo "warning: $1; its tests will be skipped" >&2
  exit 0
}
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo ">>> installing Debian's prometheus (promtool, dashboard check)"
  running_before=" $(pgrep -x prometheus | tr '\n' ' ') "
  installed=1
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
    || installed=0
  # The Debian package starts a system service on :9090; the tests run their own instance.
  # Stop only what this install started, never a Prometheus that was already running.
  (command -v systemctl >/dev/null && systemctl stop prometheus 2>/dev/null) || true
  for pid in $(pgrep -x prometheus); do
    case "$running_before" in *" $pid "*) ;; *) kill "$pid" 2>/dev/null || true ;; esac
  done
  [ "$installed" = 1 ] || fail "could not install Debian's prometheus"
  if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    fail "Debian's prometheus installed, but promtool or prometheus is not on PATH"
  fi
else
  fail "prometheus/promtool not found; install Debian's 'prometheus' to run the dashboard check"
fi
exit 0
