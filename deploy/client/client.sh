#!/bin/bash
# The compose test client (service `client`, profile "test"), run in the
# weightinit image on the private network: for each request in $OUT/requests/,
# fetch it through the balancer ($LB) $RUNS times and check that every copy is
# byte-identical and matches the Digest RPC:
#   - grpcurl Generate: the whole stream (every chunk's bytes, in JSON) hashed
#     with sha256, and each tensor's BLAKE3 from its end message;
#   - `weightinit fetch` (when the binary has it): the file's sha256.
# Copies are kept in $OUT for the host to verify further (deploy/ci_checks.py).
# Prints "client: N passed, N failed, N skipped"; exits non-zero on a failure.
set -uo pipefail

LB=${LB:-lb:50051}
RUNS=${RUNS:-6}
OUT=${OUT:-/out}
GRPCURL=${GRPCURL:-/opt/grpcurl}
passed=0 failed=0 skipped=0

ok() { passed=$((passed + 1)); echo "PASS $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }

# The BLAKE3 (base64) values in grpcurl's JSON output, in order.
digests_of() { grep -o '"blake3": "[^"]*"' "$1" | cut -d'"' -f4 | tr '\n' ' '; }

if weightinit fetch --help >/dev/null 2>&1; then has_fetch=1; else has_fetch=0; fi

for req in "$OUT"/requests/*.json; do
  name=$(basename "$req" .json)
  mkdir -p "$OUT/$name"
  if ! timeout 60 "$GRPCURL" -plaintext -d @ "$LB" weightinit.v1.WeightInit/Digest <"$req" >"$OUT/$name/digest.json"; then
    bad "$name: Digest through $LB"
    continue
  fi
  want=$(digests_of "$OUT/$name/digest.json")

  shas=()
  for i in $(seq 1 "$RUNS"); do
    f=$OUT/$name/generate-$i.json
    if ! timeout 300 "$GRPCURL" -plaintext -max-msg-sz 8388608 -d @ "$LB" \
      weightinit.v1.WeightInit/Generate <"$req" >"$f" 2>"$f.err"; then
      bad "$name: Generate run $i: $(tr '\n' ' ' <"$f.err")"
      continue
    fi
    got=$(digests_of "$f")
    [[ $got == "$want" ]] || bad "$name: Generate run $i end digests '$got' != Digest '$want'"
    shas+=("$(sha256sum <"$f" | cut -d' ' -f1)")
    echo "  $name generate run $i: sha256 ${shas[-1]} ($(stat -c %s "$f") bytes of JSON)"
    ((i > 1)) && rm -f "$f" # keep the first copy for the host's byte-level check
  done
  if ((${#shas[@]} == RUNS)) && [[ $(printf '%s\n' "${shas[@]}" | sort -u | wc -l) == 1 ]]; then
    ok "$name: $RUNS Generate streams through the balancer are byte-identical and match Digest"
  else
    bad "$name: Generate streams differ or failed: ${shas[*]}"
  fi

  if ((has_fetch)); then
    shas=()
    for i in $(seq 1 "$RUNS"); do
      f=$OUT/$name/fetch-$i.safetensors
      if ! timeout 300 weightinit fetch --server "http://$LB" --request "$req" --out "$f" >"$f.log" 2>&1; then
        bad "$name: weightinit fetch run $i: $(tail -n 3 "$f.log" | tr '\n' ' ')"
        continue
      fi
      shas+=("$(sha256sum <"$f" | cut -d' ' -f1)")
      echo "  $name fetch run $i: sha256 ${shas[-1]}"
      ((i > 1)) && rm -f "$f"
    done
    if ((${#shas[@]} == RUNS)) && [[ $(printf '%s\n' "${shas[@]}" | sort -u | wc -l) == 1 ]]; then
      ok "$name: $RUNS weightinit fetch files are byte-identical"
    else
      bad "$name: fetched files differ or failed: ${shas[*]}"
    fi
  else
    skipped=$((skipped + 1))
    echo "PENDING $name: weightinit fetch (not in this image yet)"
  fi
done

echo "client: $passed passed, $failed failed, $skipped skipped"
((failed == 0 && passed > 0))
