#!/usr/bin/env bash
# Build the deployment images with podman and run them (issue 21), on a machine that reaches
# the package registries but no container registry. `make image-test` runs it, and
# tests/deploy/test_deploy.py runs it from `make test`.
#
#   scripts/image-test.sh [PHASE...]     default: all phases, in this order
#
#   base     local stand-ins for the official base images, made from Debian packages
#            (mmdebstrap --variant=minbase bookworm | podman import), tagged with a hash of
#            their recipe and reused while it is unchanged:
#              python:3.11-slim-bookworm -> localhost/vllm-caote-base/python:3.11-<hash>
#              prom/prometheus           -> localhost/vllm-caote-base/prometheus:debian-<hash>
#   build    deploy/Dockerfile.cpu -> vllm-caote:cpu (left in podman's store), through
#            scripts/install.sh --fetch-model, FROM the stand-in (--build-arg PYTHON_IMAGE)
#   serve    README.md's `docker run` line of vllm-caote:cpu, run with podman: healthy (its
#            HEALTHCHECK), a budgeted completion with kv_eviction stats, a bad budget answered
#            400, vllm_caote:* on /metrics
#   compose  deploy/docker-compose.yml, profile cpu, through podman-compose: the server and
#            Prometheus (the Debian stand-in); budgeted traffic, then vllm_caote:* in Prometheus.
#            Grafana is not started: its image cannot be had here.
#   cuda     the CUDA Dockerfile FROM a stand-in for vllm/vllm-openai (vllm-caote:cpu with the
#            plugin removed and vLLM-CPU as "python3"): its install step (install.sh --flavor
#            none), user, entry point; the image is then checked with entrypoint --dry-run.
#
# Each phase writes $WORK/report/<phase>.json (tests/deploy/test_deploy.py reads them); logs go to
# $WORK/logs/. Exit status: 0 all good, 1 a check failed, 3 a prerequisite is missing (the
# message names it).
#
# podman is configured only through deploy/podman/ (containers.conf: runc and the ulimits this
# machine allows; registries.conf: no search registries) via CONTAINERS_CONF and
# CONTAINERS_REGISTRIES_CONF; the machine's /etc/containers is not touched. Images stay in
# root's default store (/var/lib/containers/storage), so later runs reuse layers.
#
# Environment:
#   IMAGE_TEST_WORK     work folder (default build/image-test)
#   IMAGE_TEST_KVCACHE  VLLM_CPU_KVCACHE_SPACE of the test containers in GiB (default 1)
#   IMAGE_TEST_KEEP=1   leave the containers running (debugging)
#   IMAGE_TEST_START_TIMEOUT  seconds a server may take to become healthy (default 900)
#   IMAGE_TEST_OMP_BIND VLLM_CPU_OMP_THREADS_BIND of the test servers (default: the image's,
#                       auto); nobind on a machine whose other vLLM processes already pin core 0
#   IMAGE_TEST_WHEELS   local wheel folders (find-links) and simple indexes (paths ending in
#                       /simple; their parent is mounted) made visible to RUN steps, read from
#                       pip's own configuration when unset (find-links, file:// extra-index-url);
#                       here: torch 2.13.0+cpu from /opt/wheels
#   IMAGE_TEST_PIP_EXTRA_INDEX_URL  the Dockerfile's PIP_EXTRA_INDEX_URL build argument
#                       (default: the file:// indexes found above, or unset = Dockerfile default)
# shellcheck disable=SC2329 # the phases run as "phase_$p", and the helpers from them
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
WORK="${IMAGE_TEST_WORK:-$ROOT/build/image-test}"
mkdir -p "$WORK/logs" "$WORK/report"
WORK="$(cd "$WORK" && pwd)"
KVCACHE="${IMAGE_TEST_KVCACHE:-1}"
START_TIMEOUT="${IMAGE_TEST_START_TIMEOUT:-900}"
SERVER_ENV=(-e "VLLM_CPU_KVCACHE_SPACE=$KVCACHE")
[ -n "${IMAGE_TEST_OMP_BIND:-}" ] && SERVER_ENV+=(-e "VLLM_CPU_OMP_THREADS_BIND=$IMAGE_TEST_OMP_BIND")
CPU_IMAGE=localhost/vllm-caote:cpu
CUDA_IMAGE=localhost/vllm-caote:cuda-standin
PROJECT=vllm-caote-imagetest
SERVE_CTR=vllm-caote-imagetest-serve
PODMAN_CONF="$ROOT/deploy/podman"
export CONTAINERS_CONF="$PODMAN_CONF/containers.conf"
export CONTAINERS_REGISTRIES_CONF="$PODMAN_CONF/registries.conf"
export BUILDAH_FORMAT=docker # keeps HEALTHCHECK and SHELL, which the OCI format drops
CHECKS=(python3 "$ROOT/scripts/image_test_checks.py")

log() { echo ">>> image-test: $*" >&2; }
die() {
  echo "image-test: FAILED: $*" >&2
  exit 1
}
need() { # prerequisite missing: exit 3 with the reason
  echo "image-test: MISSING: $*" >&2
  exit 3
}
now() { date +%s.%N; }
since() { python3 -c "import sys; print(round($(now) - $1, 1))"; }

# --- prerequisites ------------------------------------------------------------------------

preflight() {
  [ "$(id -u)" = 0 ] || need "runs as root (rootful podman builds and runs the images)"
  local cmd pkg missing_pkgs=()
  for pair in "podman podman" "runc runc" "mmdebstrap mmdebstrap" "python3 python3"; do
    read -r cmd pkg <<<"$pair"
    command -v "$cmd" >/dev/null 2>&1 || missing_pkgs+=("$pkg")
  done
  [ ${#missing_pkgs[@]} -eq 0 ] ||
    need "Debian packages ${missing_pkgs[*]} (scripts/system-deps.sh installs them)"
  podman info >/dev/null 2>"$WORK/logs/podman-info.log" ||
    need "podman does not work here: $(tail -3 "$WORK/logs/podman-info.log")"
}

# podman-compose from PyPI, in a venv of its own under $WORK (Debian's 1.0.3 has no profiles).
PODMAN_COMPOSE_VERSION=1.5.0
compose_tool() {
  local venv="$WORK/tools"
  if [ ! -x "$venv/bin/podman-compose" ] ||
    ! "$venv/bin/podman-compose" --version 2>/dev/null | grep -q "$PODMAN_COMPOSE_VERSION"; then
    log "installing podman-compose==$PODMAN_COMPOSE_VERSION (PyPI) into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || need "python3 -m venv (Debian python3-venv)"
    "$venv/bin/python" -m pip install -q "podman-compose==$PODMAN_COMPOSE_VERSION" \
      >"$WORK/logs/podman-compose-install.log" 2>&1 ||
      need "podman-compose==$PODMAN_COMPOSE_VERSION from PyPI: $(tail -3 "$WORK/logs/podman-compose-install.log")"
  fi
  PODMAN_COMPOSE="$venv/bin/podman-compose"
}

# --- the host's pip setup, made visible to RUN steps ---------------------------------------

# Local folders pip reads (find-links, file:// indexes, the CA bundle): bind-mounted read-only
# into RUN steps at the same path, and a pip.conf naming them. Nothing of it stays in the image.
pip_mounts() {
  local cfg folders=() f
  cfg="$(python3 -m pip config list 2>/dev/null || true)"
  if [ -n "${IMAGE_TEST_WHEELS:-}" ]; then
    read -r -a folders <<<"$IMAGE_TEST_WHEELS"
  else
    for f in $(sed -n "s/.*find-links='\(.*\)'/\1/p; s/.*extra-index-url='\(.*\)'/\1/p" <<<"$cfg") \
      ${PIP_FIND_LINKS:-} ${PIP_EXTRA_INDEX_URL:-}; do
      f="${f#file://}"
      case "$f" in /*) [ -d "$f" ] && folders+=("$f") ;; esac
    done
  fi
  MOUNTS=()
  FILE_INDEXES=()
  FIND_LINKS=()
  local seen=" "
  local mount
  for f in "${folders[@]}"; do
    case "$seen" in *" $f "*) continue ;; esac
    seen+="$f "
    if [ "$(basename "$f")" = simple ]; then
      # a simple index: its pages link to files beside it (../../files/...), mount the parent
      FILE_INDEXES+=("file://$f")
      mount="$(dirname "$f")"
    else
      FIND_LINKS+=("$f")
      mount="$f"
    fi
    MOUNTS+=(-v "$mount:$mount:ro")
  done
  local ca=""
  for f in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$f" ] && [ -f "$f" ]; then
      ca="$f"
      break
    fi
  done
  {
    echo "# written by scripts/image-test.sh: mounted at /etc/pip.conf during RUN steps"
    echo "[global]"
    [ ${#FIND_LINKS[@]} -gt 0 ] && echo "find-links = ${FIND_LINKS[*]}"
    [ -n "$ca" ] && echo "cert = /etc/ssl/certs/ca-certificates.crt"
  } >"$WORK/pip.conf"
  MOUNTS+=(-v "$WORK/pip.conf:/etc/pip.conf:ro")
  # the host's CA bundle (a TLS-inspecting proxy's root, if any) over the image's own
  [ -n "$ca" ] && MOUNTS+=(-v "$ca:/etc/ssl/certs/ca-certificates.crt:ro")
  BUILD_ARGS=()
  local extra="${IMAGE_TEST_PIP_EXTRA_INDEX_URL-${FILE_INDEXES[*]}}"
  # The Dockerfile's default (PyTorch's CPU index) stays unless a local index replaces it; a
  # local wheel folder with torch 2.13.0+cpu turns it off (empty), which the Dockerfile allows.
  if [ -n "$extra" ] || [ ${#FIND_LINKS[@]} -gt 0 ]; then
    BUILD_ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra")
  fi
}

# --- base images --------------------------------------------------------------------------

DEBIAN_SUITE=bookworm
DEBIAN_SOURCES=(
  "deb http://deb.debian.org/debian bookworm main"
  "deb http://deb.debian.org/debian bookworm-updates main"
  "deb http://deb.debian.org/debian-security bookworm-security main"
)
# python:3.11-slim-bookworm: Debian slim + Python 3.11 with venv/pip (ensurepip), `python`,
# CA certificates and useradd (passwd); libnuma1 is left to the Dockerfile's own apt step.
PYTHON_BASE_PKGS="python3.11,python3.11-venv,python-is-python3,ca-certificates,passwd"
PYTHON_BASE_CHANGES=('ENV LANG=C.UTF-8' 'CMD ["python3"]')

recipe_hash() { # of everything that makes the base images
  {
    echo "$DEBIAN_SUITE"
    printf '%s\n' "${DEBIAN_SOURCES[@]}" "$PYTHON_BASE_PKGS" "${PYTHON_BASE_CHANGES[@]}"
    cat "$PODMAN_CONF/Containerfile.prometheus"
  } | sha256sum | cut -c1-12
}

phase_base() {
  local t0 hash changes=() c
  t0="$(now)"
  hash="$(recipe_hash)"
  PYTHON_BASE="localhost/vllm-caote-base/python:3.11-$hash"
  PROM_IMAGE="localhost/vllm-caote-base/prometheus:debian-$hash"
  local made=()
  if ! podman image exists "$PYTHON_BASE"; then
    log "making $PYTHON_BASE (stands in for python:3.11-slim-bookworm) with mmdebstrap"
    for c in "${PYTHON_BASE_CHANGES[@]}"; do changes+=(--change "$c"); done
    mmdebstrap --variant=minbase --include="$PYTHON_BASE_PKGS" --aptopt='Acquire::Retries "3"' \
      "$DEBIAN_SUITE" "$WORK/base.tar" "${DEBIAN_SOURCES[@]}" </dev/null \
      >"$WORK/logs/mmdebstrap.log" 2>&1 ||
      die "mmdebstrap failed (needs deb.debian.org): $(tail -5 "$WORK/logs/mmdebstrap.log")"
    podman import "${changes[@]}" "$WORK/base.tar" "$PYTHON_BASE" >"$WORK/logs/import.log" 2>&1 ||
      die "podman import failed: $(tail -5 "$WORK/logs/import.log")"
    rm -f "$WORK/base.tar"
    made+=(python)
  fi
  if ! podman image exists "$PROM_IMAGE"; then
    log "building $PROM_IMAGE (stands in for prom/prometheus) from Debian's prometheus"
    podman build --format docker --build-arg "BASE_IMAGE=$PYTHON_BASE" -t "$PROM_IMAGE" \
      -f "$PODMAN_CONF/Containerfile.prometheus" "$PODMAN_CONF" \
      >"$WORK/logs/build-prometheus.log" 2>&1 ||
      die "building the Prometheus stand-in failed: $(tail -5 "$WORK/logs/build-prometheus.log")"
    made+=(prometheus)
  fi
  "${CHECKS[@]}" report "$WORK/report/base.json" python_base="$PYTHON_BASE" \
    prometheus_image="$PROM_IMAGE" made="${made[*]}" seconds="$(since "$t0")"
}

ensure_base() { [ -n "${PYTHON_BASE:-}" ] || phase_base; }

# --- the CPU image ------------------------------------------------------------------------

# podman build, timed; "cached" when every step came from the layer cache.
build_image() { # name logfile podman-build-args...
  local name="$1" logf="$2" t0 rc=0 old new
  shift 2
  t0="$(now)"
  old="$(podman image inspect --format '{{.Id}}' "$name" 2>/dev/null || true)"
  podman build --format docker --layers "$@" >"$logf" 2>&1 || rc=$?
  [ "$rc" = 0 ] || die "building $name failed (log $logf): $(grep -v 'is ignored' "$logf" | tail -15)"
  # The image this build replaced (now untagged, ~4 GB): removed unless something still uses it.
  new="$(podman image inspect --format '{{.Id}}' "$name")"
  if [ -n "$old" ] && [ "$old" != "$new" ]; then podman rmi "$old" >/dev/null 2>&1 || true; fi
  local steps cached
  steps="$(grep -c '^STEP ' "$logf" || true)"
  cached="$(grep -c '^--> Using cache' "$logf" || true)"
  BUILD_SECONDS="$(since "$t0")"
  BUILD_STEPS="$steps"
  BUILD_CACHED="$cached"
}

phase_build() {
  ensure_base
  pip_mounts
  log "building $CPU_IMAGE from deploy/Dockerfile.cpu (FROM $PYTHON_BASE)"
  build_image "$CPU_IMAGE" "$WORK/logs/build-cpu.log" -f deploy/Dockerfile.cpu -t "$CPU_IMAGE" \
    --build-arg "PYTHON_IMAGE=$PYTHON_BASE" "${BUILD_ARGS[@]}" "${MOUNTS[@]}" .
  local id
  id="$(podman image inspect --format '{{.Id}}' "$CPU_IMAGE")"
  log "built $CPU_IMAGE ${id:0:12} in ${BUILD_SECONDS}s ($BUILD_CACHED of $BUILD_STEPS steps cached)"
  # Nothing of the build-time pip setup may stay in the image: podman leaves the mount points
  # (an empty /etc/pip.conf, empty folders), never their content.
  local points=(/etc/pip.conf)
  for ((i = 1; i < ${#MOUNTS[@]}; i += 2)); do
    case "${MOUNTS[i]}" in *:/etc/ssl/*) ;; *) points+=("$(cut -d: -f2 <<<"${MOUNTS[i]}")") ;; esac
  done
  podman run --rm --entrypoint bash "$CPU_IMAGE" -c \
    'for p in "$@"; do [ -e "$p" ] && find "$p" -type f -size +0 -print | head -5; done; true' \
    _ "${points[@]}" >"$WORK/logs/leftovers.txt" 2>/dev/null ||
    die "could not look for build-time leftovers in $CPU_IMAGE"
  "${CHECKS[@]}" report "$WORK/report/build.json" image="$CPU_IMAGE" image_id="$id" \
    base="$PYTHON_BASE" seconds="$BUILD_SECONDS" steps="$BUILD_STEPS" cached_steps="$BUILD_CACHED" \
    leftovers="$(tr '\n' ' ' <"$WORK/logs/leftovers.txt")" \
    size="$(podman image inspect --format '{{.Size}}' "$CPU_IMAGE")"
}

ensure_cpu_image() {
  podman image exists "$CPU_IMAGE" || phase_build
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- serve: podman run --------------------------------------------------------------------

cleanup_serve() {
  podman rm -f -t 5 "$SERVE_CTR" >/dev/null 2>&1 || true
}

phase_serve() {
  ensure_cpu_image
  cleanup_serve
  local port t0
  port="$(free_port)"
  t0="$(now)"
  # The README's own `docker run` line (between its image-test markers), run with podman:
  # detached and named, port 8000 on 127.0.0.1:$port, the test's -e settings; flags as written.
  local run=()
  "${CHECKS[@]}" readme-run "$ROOT/README.md" "$SERVE_CTR" "$port" "$CPU_IMAGE" "${SERVER_ENV[@]}" \
    >"$WORK/serve-command" || die "no docker run line of the CPU image in README.md"
  mapfile -d '' -t run <"$WORK/serve-command"
  SERVE_COMMAND="${run[*]}"
  log "README's docker run line: $SERVE_COMMAND"
  "${run[@]}" >"$WORK/logs/serve-run.log" 2>&1 ||
    die "podman run failed: $(cat "$WORK/logs/serve-run.log")"
  # podman runs HEALTHCHECKs from systemd timers; without systemd, run the image's own check.
  local health=starting deadline=$(($(date +%s) + START_TIMEOUT))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$SERVE_CTR" 2>/dev/null)" != true ]; then
      podman logs "$SERVE_CTR" >"$WORK/logs/serve.log" 2>&1 || true
      die "the container exited during start-up; log tail:
$(tail -40 "$WORK/logs/serve.log")"
    fi
    if podman healthcheck run "$SERVE_CTR" >/dev/null 2>&1; then
      health="$(podman inspect --format '{{.State.Health.Status}}' "$SERVE_CTR" 2>/dev/null ||
        podman inspect --format '{{.State.Healthcheck.Status}}' "$SERVE_CTR")"
      [ "$health" = healthy ] && break
    fi
    sleep 5
  done
  podman logs "$SERVE_CTR" >"$WORK/logs/serve.log" 2>&1 || true
  [ "$health" = healthy ] || die "not healthy after $START_TIMEOUT s ($health); log tail:
$(tail -40 "$WORK/logs/serve.log")"
  local up_s
  up_s="$(since "$t0")"
  log "healthy after ${up_s}s; checking the API"
  "${CHECKS[@]}" serve "http://127.0.0.1:$port" "$WORK/report/serve-api.json" ||
    die "API checks failed against the container (log $WORK/logs/serve.log)"
  local user
  user="$(podman exec "$SERVE_CTR" id -u)"
  podman logs "$SERVE_CTR" >"$WORK/logs/serve.log" 2>&1 || true
  "${CHECKS[@]}" report "$WORK/report/serve.json" health="$health" startup_seconds="$up_s" \
    uid="$user" api="@$WORK/report/serve-api.json" command="$SERVE_COMMAND" \
    plugin_ready="$(grep -c 'vllm-caote: KV eviction ready' "$WORK/logs/serve.log" || true)"
  [ "${IMAGE_TEST_KEEP:-0}" = 1 ] || cleanup_serve
}

# --- compose: podman-compose, profile cpu -------------------------------------------------

compose() {
  local files=(-f deploy/docker-compose.yml)
  if [ -n "${IMAGE_TEST_OMP_BIND:-}" ]; then
    printf 'services:\n  vllm-cpu:\n    environment:\n      VLLM_CPU_OMP_THREADS_BIND: "%s"\n' \
      "$IMAGE_TEST_OMP_BIND" >"$WORK/compose.override.yml"
    files+=(-f "$WORK/compose.override.yml")
  fi
  "$PODMAN_COMPOSE" -p "$PROJECT" "${files[@]}" --profile cpu "$@"
}

cleanup_compose() {
  [ -n "${PODMAN_COMPOSE:-}" ] || return 0
  compose down -v -t 5 >>"$WORK/logs/compose-down.log" 2>&1 || true
}

phase_compose() {
  ensure_base
  ensure_cpu_image
  compose_tool
  export VLLM_PORT PROMETHEUS_PORT PROMETHEUS_IMAGE="$PROM_IMAGE" VLLM_CPU_KVCACHE_SPACE="$KVCACHE"
  VLLM_PORT="$(free_port)"
  PROMETHEUS_PORT="$(free_port)"
  cleanup_compose
  local t0
  t0="$(now)"
  log "podman-compose --profile cpu up vllm-cpu prometheus (server :$VLLM_PORT, Prometheus :$PROMETHEUS_PORT)"
  # Grafana's image cannot be had without a registry: only the server and Prometheus start.
  compose up -d --no-build vllm-cpu prometheus >"$WORK/logs/compose-up.log" 2>&1 ||
    die "podman-compose up failed: $(tail -20 "$WORK/logs/compose-up.log")"
  "${CHECKS[@]}" wait "http://127.0.0.1:$VLLM_PORT/health" "$START_TIMEOUT" ||
    {
      compose logs >"$WORK/logs/compose.log" 2>&1 || true
      die "the compose server is not healthy; log tail:
$(tail -40 "$WORK/logs/compose.log")"
    }
  local up_s
  up_s="$(since "$t0")"
  log "compose server up after ${up_s}s; budgeted traffic, then Prometheus"
  "${CHECKS[@]}" compose "http://127.0.0.1:$VLLM_PORT" "http://127.0.0.1:$PROMETHEUS_PORT" \
    "$WORK/report/compose-checks.json" || {
    compose logs >"$WORK/logs/compose.log" 2>&1 || true
    die "compose checks failed (logs $WORK/logs/compose.log)"
  }
  compose ps >"$WORK/logs/compose-ps.log" 2>&1 || true
  compose logs >"$WORK/logs/compose.log" 2>&1 || true
  "${CHECKS[@]}" report "$WORK/report/compose.json" startup_seconds="$up_s" \
    compose_version="$PODMAN_COMPOSE_VERSION" services="vllm-cpu prometheus" \
    checks="@$WORK/report/compose-checks.json"
  [ "${IMAGE_TEST_KEEP:-0}" = 1 ] || cleanup_compose
}

# --- cuda: the root Dockerfile on a stand-in base -----------------------------------------

phase_cuda() {
  ensure_cpu_image
  pip_mounts
  local standin=localhost/vllm-caote-base/vllm-openai
  local standin_tag="v0.32.0-cpu-standin"
  log "building the vllm/vllm-openai stand-in from $CPU_IMAGE"
  build_image "$standin:$standin_tag" "$WORK/logs/build-vllm-openai-standin.log" \
    -f "$PODMAN_CONF/Containerfile.vllm-openai-standin" --build-arg "CPU_IMAGE=$CPU_IMAGE" \
    -t "$standin:$standin_tag" "$PODMAN_CONF"
  log "building $CUDA_IMAGE from Dockerfile (FROM $standin:$standin_tag)"
  build_image "$CUDA_IMAGE" "$WORK/logs/build-cuda.log" -f Dockerfile -t "$CUDA_IMAGE" \
    --build-arg "VLLM_IMAGE=$standin" --build-arg "VLLM_VERSION=$standin_tag" "${MOUNTS[@]}" .
  local cuda_s="$BUILD_SECONDS" cuda_cached="$BUILD_CACHED" cuda_steps="$BUILD_STEPS"
  podman run --rm "$CUDA_IMAGE" --dry-run --tensor-parallel-size 2 >"$WORK/logs/cuda-dry-run.log" 2>&1 ||
    die "the CUDA image's entry point failed: $(cat "$WORK/logs/cuda-dry-run.log")"
  podman run --rm --entrypoint python3 "$CUDA_IMAGE" -c \
    "import importlib.metadata as m, json, os, vllm, vllm_caote; print(json.dumps({'uid': os.getuid(), 'vllm': vllm.__version__, 'vllm_caote': vllm_caote.__version__, 'plugin_location': vllm_caote.__file__, 'entry_points': sorted(e.name + '=' + e.value for e in m.entry_points(group='vllm.general_plugins'))}))" \
    >"$WORK/logs/cuda-import.json" 2>"$WORK/logs/cuda-import.err" ||
    die "the CUDA image does not import vllm_caote: $(tail -5 "$WORK/logs/cuda-import.err")"
  "${CHECKS[@]}" report "$WORK/report/cuda.json" image="$CUDA_IMAGE" base="$standin:$standin_tag" \
    seconds="$cuda_s" steps="$cuda_steps" cached_steps="$cuda_cached" \
    dry_run="$(tail -1 "$WORK/logs/cuda-dry-run.log")" import="@$WORK/logs/cuda-import.json"
}

# --- main ---------------------------------------------------------------------------------

on_exit() {
  local rc=$?
  if [ "${IMAGE_TEST_KEEP:-0}" != 1 ]; then
    cleanup_serve
    cleanup_compose
  fi
  exit "$rc"
}

main() {
  local phases=("$@") p t0
  [ ${#phases[@]} -gt 0 ] || phases=(base build serve compose cuda)
  for p in "${phases[@]}"; do
    case "$p" in base | build | serve | compose | cuda) ;; *) echo "image-test: unknown phase $p" >&2; exit 2 ;; esac
  done
  # One run at a time on a machine (names, ports and the image tag are shared).
  exec 9>"$WORK/.lock"
  if command -v flock >/dev/null 2>&1; then
    flock -w 3600 9 || die "another image test holds $WORK/.lock"
  fi
  preflight
  trap on_exit EXIT
  t0="$(now)"
  for p in "${phases[@]}"; do
    rm -f "$WORK/report/$p.json"
    "phase_$p"
  done
  log "done in $(since "$t0")s: ${phases[*]} (reports in $WORK/report)"
}

# (one line: bash has read the whole script before it runs, so editing it mid-run is safe)
main "$@"; exit
