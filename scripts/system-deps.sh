#!/usr/bin/env bash
# System packages the tests use, from Debian:
#   prometheus                promtool + a real Prometheus (dashboard check)
#   podman runc mmdebstrap    the deployment image test (scripts/image-test.sh): podman builds and
#   uidmap catatonit netavark runs the images (runc: crun fails on hybrid-cgroup kernels), and
#   aardvark-dns slirp4netns  mmdebstrap makes the local base images (no registry is reachable).
#   fuse-overlayfs iptables   netavark sets up the build/run network with iptables, which
#                             --no-install-recommends does not bring ("netavark: No such file")
# Installs only what is missing and only when apt-get can run. Under CI (CI=true), where every
# test must run, a failed install fails setup; elsewhere it warns and the tests that need it
# skip, naming the package.
set -u
# "command package" pairs: a package is installed when its command is missing.
needs=(
  "promtool prometheus"
  "prometheus prometheus"
  "podman podman"
  "runc runc"
  "mmdebstrap mmdebstrap"
  "newuidmap uidmap"
  "/usr/libexec/podman/catatonit catatonit"
  "/usr/lib/podman/netavark netavark"
  "/usr/lib/podman/aardvark-dns aardvark-dns"
  "slirp4netns slirp4netns"
  "fuse-overlayfs fuse-overlayfs"
  "iptables iptables"
)
have() { case "$1" in /*) [ -x "$1" ] ;; *) command -v "$1" >/dev/null 2>&1 ;; esac; }
pkgs=()
for pair in "${needs[@]}"; do
  read -r cmd pkg <<<"$pair"
  if ! have "$cmd"; then
    case " ${pkgs[*]} " in *" $pkg "*) ;; *) pkgs+=("$pkg") ;; esac
  fi
done
[ ${#pkgs[@]} -eq 0 ] && exit 0

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
  echo ">>> installing Debian packages: ${pkgs[*]}"
  running_before=" $(pgrep -x prometheus | tr '\n' ' ') "
  installed=1
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null) \
    || installed=0
  # The Debian package starts a system service on :9090; the tests run their own instance.
  # Stop only what this install started, never a Prometheus that was already running.
  (command -v systemctl >/dev/null && systemctl stop prometheus 2>/dev/null) || true
  for pid in $(pgrep -x prometheus); do
    case "$running_before" in *" $pid "*) ;; *) kill "$pid" 2>/dev/null || true ;; esac
  done
  [ "$installed" = 1 ] || fail "could not install Debian's ${pkgs[*]}"
  for pair in "${needs[@]}"; do
    read -r cmd pkg <<<"$pair"
    have "$cmd" || fail "Debian's $pkg installed, but $cmd is not there"
  done
else
  fail "missing Debian packages: ${pkgs[*]} (apt-get as root installs them)"
fi
exit 0
