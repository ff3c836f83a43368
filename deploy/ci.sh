#!/usr/bin/env bash
# All deployment checks, in order of cost, sharing one image build:
#   ci-kubernetes.sh (seconds, no docker) -> ci-docker.sh -> ci-limits.sh -> ci-compose.sh.
# The weightinit:ci-PID image is removed at the end (KEEP_IMAGE=1 keeps it); the
# base images and docker's build cache are kept, so a second run rebuilds only
# what changed. Bounded: each script has its own watchdog (MAX_SECONDS).
# Last line: "deploy: N passed, N failed, N skipped" (summed over the four).
set -uo pipefail
DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T0=$SECONDS
passed=0 failed=0 skipped=0
export IMAGE=${IMAGE:-weightinit:ci-$$}

run() {
  local name=$1 out rc line
  shift
  printf '\n== %s\n' "$name"
  out=$(mktemp)
  "$@" 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  line=$(grep -a -E "^$name: [0-9]+ passed, [0-9]+ failed" "$out" | tail -n1)
  rm -f "$out"
  if [[ $line =~ ([0-9]+)\ passed,\ ([0-9]+)\ failed(,\ ([0-9]+)\ skipped)? ]]; then
    passed=$((passed + BASH_REMATCH[1]))
    failed=$((failed + BASH_REMATCH[2]))
    skipped=$((skipped + ${BASH_REMATCH[4]:-0}))
  fi
  if ((rc != 0)) && [[ ! $line =~ [1-9][0-9]*\ failed ]]; then failed=$((failed + 1)); fi
  printf '== %s: exit %d after %d s total\n' "$name" "$rc" $((SECONDS - T0))
}

run ci-kubernetes "$DIR/ci-kubernetes.sh"
run ci-docker env KEEP_IMAGE=1 "$DIR/ci-docker.sh"
run ci-limits env KEEP_IMAGE=1 "$DIR/ci-limits.sh"
run ci-compose env KEEP_IMAGE="${KEEP_IMAGE:-0}" "$DIR/ci-compose.sh"

# ci-compose removes the image when it built it; not when it failed before that.
if [[ ${KEEP_IMAGE:-0} != 1 ]]; then docker rmi "$IMAGE" >/dev/null 2>&1 || true; fi

echo
echo "deploy checks took $((SECONDS - T0)) s"
echo "deploy: $passed passed, $failed failed, $skipped skipped"
((failed == 0))
