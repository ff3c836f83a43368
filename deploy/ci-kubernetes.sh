#!/usr/bin/env bash
# Offline validation of deploy/kubernetes/*.yaml (no cluster, no network beyond
# PyPI for the one-time install):
#   kubernetes-validate (PyPI; bundles the Kubernetes JSON schemas) in strict
#   mode, against the oldest version these manifests claim (1.27: native gRPC
#   probes) and the newest bundled; any warning (e.g. a kind with no schema)
#   counts as a failure; then the rules schemas cannot express (ci_checks.py
#   k8s-policy); the replica's memory limit, CPUs and flags are the same in the
#   Deployment and deploy/compose.yaml, each flag of the memory bound set
#   (ci_checks.py shipped-limits; ci-limits.sh checks the bound itself). To show that it does reject bad
#   manifests, deliberately broken copies in a temp dir must each fail.
# Last line: "ci-kubernetes: N passed, N failed, N skipped".
set -Eeuo pipefail
# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
setup_traps
start_watchdog "${MAX_SECONDS:-900}"

K8S_DIR=$DEPLOY/kubernetes
K8S_VERSIONS=${K8S_VERSIONS:-"1.27.0 1.37.0"}

# Only what this check needs (the full tool set is ensure_venv's).
if ! [[ -x $VENV/bin/kubernetes-validate ]]; then
  [[ -x $PY ]] || timeout 120 python3 -m venv "$VENV"
  timeout 600 "$VENV/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0' >&2
fi
KV=$VENV/bin/kubernetes-validate

# strict_validate FILE...: schemas of every listed version, strict; warnings fail.
strict_validate() {
  local v out rc=0
  for v in $K8S_VERSIONS; do
    out=$(timeout 120 "$KV" --strict --quiet -k "$v" "$@" 2>&1) || rc=1
    [[ -n $out ]] && printf '    %s\n' "$out" | head -n 5
    grep -q -E 'WARN|ERROR' <<<"$out" && rc=1
  done
  return $rc
}
policy() { timeout 60 "$PY" "$DEPLOY/ci_checks.py" k8s-policy --dir "$1"; }
# memory DIR: DIR has deployment.yaml and compose.yaml.
memory() { timeout 60 "$PY" "$DEPLOY/ci_checks.py" shipped-limits --kubernetes "$1/deployment.yaml" --compose "$1/compose.yaml"; }
original() { if [[ $1 == compose.yaml ]]; then echo "$DEPLOY/$1"; else echo "$K8S_DIR/$1"; fi; }

mapfile -t FILES < <(find "$K8S_DIR" -maxdepth 1 -name '*.yaml' | sort)
((${#FILES[@]} >= 3)) || die "expected the manifests in $K8S_DIR"
for f in "${FILES[@]}"; do
  check "schema ($K8S_VERSIONS, strict): ${f#"$ROOT"/}" strict_validate "$f"
done
check "policy: grace, gRPC probes, securityContext, resources, selectors" policy "$K8S_DIR"
mkdir -p "$TMP/shipped" && cp "$(original deployment.yaml)" "$(original compose.yaml)" "$TMP/shipped/"
check "memory: the same limits and flags in Kubernetes and compose, every flag of the bound set" memory "$TMP/shipped"

# --- deliberately broken copies must be rejected --------------------------
# expect_reject NAME HOW SED_SCRIPT FILE...: a copy of the manifests (and of
# compose.yaml) with each FILE edited by SED_SCRIPT must fail HOW (schema,
# policy or memory).
expect_reject() {
  local name=$1 how=$2 script=$3 d=$TMP/broken-$1 f
  shift 3
  rm -rf "$d" && mkdir -p "$d" && cp "$K8S_DIR"/*.yaml "$(original compose.yaml)" "$d/"
  for f in "$@"; do
    sed -i -e "$script" "$d/$f"
    if cmp -s "$d/$f" "$(original "$f")"; then
      fail "broken copy '$name': the edit did not apply to $f"
      return
    fi
  done
  local rc=0
  case $how in
    schema) strict_validate "$d/$1" >"$d/out" 2>&1 || rc=$? ;;
    policy) policy "$d" >"$d/out" 2>&1 || rc=$? ;;
    memory) memory "$d" >"$d/out" 2>&1 || rc=$? ;;
  esac
  if ((rc != 0)); then
    pass "rejects $name ($how): $(sed "s|$d/||g" "$d/out" | grep -m1 -o -E "(ERROR|WARN|FAIL)[^(]*" | head -c 150)"
  else
    fail "accepted a broken manifest: $name"
  fi
}
expect_reject unknown-field schema 's/^  replicas: 3/  replica: 3/' deployment.yaml
expect_reject wrong-type schema 's/containerPort: 50051/containerPort: "50051"/' deployment.yaml
expect_reject missing-required schema 's/^        - name: weightinit$/        - nam: weightinit/' deployment.yaml
expect_reject bad-probe-field schema '0,/^              port: 50051/s//              portt: 50051/' deployment.yaml
expect_reject unknown-kind schema 's/^kind: PodDisruptionBudget/kind: PodDisruptionBudgett/' pdb.yaml
expect_reject grace-too-short policy 's/terminationGracePeriodSeconds: 45/terminationGracePeriodSeconds: 30/' deployment.yaml
expect_reject grace-mismatch policy 's/value: "30s"/value: "60s"/' deployment.yaml
expect_reject tcp-readiness-probe policy '/readinessProbe:/,/grpc:/s/grpc:/tcpSocket:/' deployment.yaml
expect_reject root-user policy 's/runAsNonRoot: true/runAsNonRoot: false/' deployment.yaml
expect_reject writable-root policy 's/readOnlyRootFilesystem: true/readOnlyRootFilesystem: false/' deployment.yaml
expect_reject caps-kept policy 's/drop: \["ALL"\]/drop: ["NET_RAW"]/' deployment.yaml
expect_reject selector-mismatch policy 's/^      app.kubernetes.io\/name: weightinit$/      app.kubernetes.io\/name: weightinit-x/' pdb.yaml
expect_reject bound-flag-unset memory 's/WEIGHTINIT_MAX_CONCURRENT_STREAMS/WEIGHTINIT_MAX_CONCURRENT_STREAM/' deployment.yaml compose.yaml
expect_reject compose-limit-differs memory 's/mem_limit: 1g/mem_limit: 2g/' compose.yaml
