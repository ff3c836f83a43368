#!/usr/bin/env bash
# The container under the shipped limits survives the attacks of issue 24, bounded in time and
# self-cleaning:
#   the image runs with the memory limit (and as much swap: none), CPUs and flags of the
#   replica in deploy/kubernetes/deployment.yaml (deploy/compose.yaml has the same:
#   ci-kubernetes.sh); that limit holds the memory bound of what the server reports of itself
#   (ci_checks.py memory-bound; the derivation is in deploy/README.md, "Memory limits");
#   then each attack in turn (ci_checks.py attack): one Digest of orthogonal [16777216, 1];
#   12, then 48 readers of permuted views that read one message and stall; 8 orthogonal
#   [4096, 4096] Generates, cancelled after a few seconds; 64 orthogonal streams cancelled
#   after 0.8 s (the server idle a second later); the two requests over --max-request-work
#   (refused). After each: not OOM-killed, not restarted, the cgroup's memory peak under the
#   limit, and a small Digest answers correctly. A container that died is replaced for the
#   next attack, so that every attack is judged on its own.
#
# Env: KEEP_IMAGE=1 keeps the image (tag $IMAGE, default weightinit:<run id>),
#      KEEP_TMP=1 keeps target/wi-ci-limits-PID/, MAX_SECONDS (default 900).
# Last line: "ci-limits: N passed, N failed, N skipped".
set -Eeuo pipefail
# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
setup_traps
start_watchdog "${MAX_SECONDS:-900}"

IMAGE=${IMAGE:-weightinit:$RUN_ID}
SERVER=$RUN_ID-server
T_START=$SECONDS
MANIFESTS=(--kubernetes "$DEPLOY/kubernetes/deployment.yaml" --compose "$DEPLOY/compose.yaml")

ensure_venv
mapfile -t LIMITS < <("$PY" "$DEPLOY/ci_checks.py" shipped-limits "${MANIFESTS[@]}" --docker-args)
[[ ${LIMITS[*]} == *--memory=* ]] || die "no memory limit read from the manifests: ${LIMITS[*]}"
log "shipped limits: ${LIMITS[*]}"
ensure_base_images
build_image "$IMAGE"

start_server() {
  docker rm -f "$SERVER" >/dev/null 2>&1 || true
  docker run -d --name "$SERVER" --label "$CI_LABEL" -p 127.0.0.1::50051 --read-only \
    --cap-drop ALL --security-opt no-new-privileges:true "${LIMITS[@]}" "$IMAGE" >/dev/null
  wait_until 90 "container healthy" is_healthy "$SERVER" || die "container never became healthy"
  ADDR=$(docker port "$SERVER" 50051/tcp | grep -m1 '^127\.0\.0\.1:')
}
running() { [[ $(docker inspect -f '{{.State.Running}}' "$SERVER" 2>/dev/null) == true ]]; }

start_server
check "memory bound: what the server reports of itself fits the limit with a margin" \
  timeout 60 "$PY" "$DEPLOY/ci_checks.py" memory-bound --grpcurl "$GRPCURL" --addr "$ADDR" \
  --container "$SERVER"
for attack in tall-digest slow-permuted-12 slow-permuted-48 orthogonal-generates \
  cancelled-orthogonal oversized-cost; do
  if ! running; then
    log "the container died in the last attack: a fresh one for $attack"
    start_server
  fi
  check "attack $attack: survived, under the memory limit, answers afterwards" \
    timeout 240 "$PY" "$DEPLOY/ci_checks.py" attack "$attack" --grpcurl "$GRPCURL" \
    --addr "$ADDR" --container "$SERVER" --vectors "$VECTORS"
done

log "took $((SECONDS - T_START)) s in all"
