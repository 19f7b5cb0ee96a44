#!/usr/bin/env bash
# System packages the tests use: Debian's prometheus (promtool + a real Prometheus for the
# dashboard check). Installs only when missing and when apt-get can run; never fails setup.
set -u
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo ">>> installing Debian's prometheus (promtool, dashboard check)"
  running_before=" $(pgrep -x prometheus | tr '\n' ' ') "
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
    || echo "warning: could not install prometheus; its tests will be skipped" >&2
  # The Debian package starts a system service on :9090; the tests run their own instance.
  # Stop only what this install started, never a Prometheus that was already running.
  (command -v systemctl >/dev/null && systemctl stop prometheus 2>/dev/null) || true
  for pid in $(pgrep -x prometheus); do
    case "$running_before" in *" $pid "*) ;; *) kill "$pid" 2>/dev/null || true ;; esac
  done
else
  echo "note: prometheus/promtool not found; install Debian's 'prometheus' to run the dashboard check" >&2
fi
exit 0
