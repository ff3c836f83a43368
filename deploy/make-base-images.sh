#!/usr/bin/env bash
# Builds, on a machine that cannot pull images, the base images the Dockerfile
# and deploy/compose.yaml start FROM, using only Debian's packages and the host's
# own Rust toolchain:
#
#   $RUNTIME_IMAGE (default debian:bookworm-slim)
#       debootstrap --variant=minbase of Debian $SUITE from the mirror apt already
#       uses (read from /etc/apt/sources.list*), with the suite's updates and
#       security fixes applied, docs stripped, then `docker import`ed.
#   $RUST_IMAGE (default rust:<host rustc major.minor>-slim-bookworm)
#       that rootfs + gcc, libc6-dev, pkg-config, ca-certificates + the active
#       rustup toolchain of the host (its sysroot) in /usr/local/rust, on PATH.
#   $NGINX_IMAGE (default weightinit-nginx:bookworm)
#       that rootfs + Debian's nginx, for the gRPC load balancer in compose.yaml.
#
# Every tag that already exists is kept (nothing is rebuilt): FORCE=1 rebuilds.
# The images carry the label io.weightinit.local-base=1 so they are never
# mistaken for the public images of the same name.
#
# Crates: when a container cannot reach crates.io (checked once with `cargo
# search` in the builder image; VENDOR=auto), or with VENDOR=always, the host
# runs `cargo vendor --locked` into deploy/cargo-vendor/crates, which the
# Dockerfile uses when present (offline build). VENDOR=never skips it.
# The vendored copy is refreshed whenever Cargo.lock changes.
#
# Needs docker and the host's cargo/rustc, and root (debootstrap, chroot) when
# a base image is missing.
#
#   deploy/make-base-images.sh                the base images (and crates)
#   deploy/make-base-images.sh --build [TAG]  the same, then the image itself:
#       `docker build -t TAG` (default weightinit:local) from the root Dockerfile
#       with these base images. The builder stage (~1.9 GB) is removed afterwards
#       unless KEEP_BUILD_CACHE=1, which keeps it as weightinit-build-cache:local
#       so that the next build only recompiles what changed.
#   deploy/make-base-images.sh --print-tags   the three tags, as VAR=value lines
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SUITE=${SUITE:-bookworm}
ARCH=${ARCH:-$(dpkg --print-architecture)}
WORK=${WORK:-$ROOT/target/docker-base}
FORCE=${FORCE:-0}
VENDOR=${VENDOR:-auto}
VENDOR_DIR=$ROOT/deploy/cargo-vendor

log() { printf '[make-base-images %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

host_rust_minor() { rustc --version | awk '{split($2, v, "."); print v[1] "." v[2]}'; }

RUNTIME_IMAGE=${RUNTIME_IMAGE:-debian:$SUITE-slim}
RUST_IMAGE=${RUST_IMAGE:-rust:$(host_rust_minor)-slim-$SUITE}
NGINX_IMAGE=${NGINX_IMAGE:-weightinit-nginx:$SUITE}

BUILD_TAG=
case ${1:-} in
  --print-tags)
    printf 'RUNTIME_IMAGE=%s\nRUST_IMAGE=%s\nNGINX_IMAGE=%s\n' "$RUNTIME_IMAGE" "$RUST_IMAGE" "$NGINX_IMAGE"
    exit 0
    ;;
  --build) BUILD_TAG=${2:-weightinit:local} ;;
  "") ;;
  *) die "usage: $0 [--build [TAG] | --print-tags]" ;;
esac
command -v docker >/dev/null || die "docker not found"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# One run at a time on this machine (CI and a developer may overlap).
mkdir -p "$WORK"
exec 9>"$WORK/.lock"
flock -w 900 9 || die "another make-base-images.sh holds $WORK/.lock"

# --- which mirror -----------------------------------------------------------
# The first URI of an enabled `deb` source (one-line *.list or deb822 *.sources)
# that lists exactly the suite $1.
apt_uri_for_suite() {
  local suite=$1 f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    awk -v s="$suite" '
      $1 == "deb" {
        i = 2
        if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
        if ($(i + 1) == s && $i ~ /^https?:\/\//) { print $i; exit }
      }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    awk -v s="$suite" '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && enabled != "no" && (" " suites " ") ~ (" " s " ") && uri ~ /^https?:\/\//) { print uri; found = 1 }
        types = ""; suites = ""; uri = ""; enabled = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); if (found) exit; next }
      { key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, ""); val = $0 }
      key == "types" { types = val }
      key == "suites" { suites = val }
      key == "uris" { split(val, u, " "); uri = u[1] }
      key == "enabled" { enabled = tolower(val) }
      END { if (!found) flush() }' "$f"
  done
}

MIRROR=${MIRROR:-$(apt_uri_for_suite "$SUITE" | head -n1)}
SECURITY_MIRROR=${SECURITY_MIRROR:-$(apt_uri_for_suite "$SUITE-security" | head -n1)}
[[ -n $MIRROR ]] || die "no enabled deb source for suite $SUITE in /etc/apt/sources.list*; set MIRROR="

# --- rootfs helpers -----------------------------------------------------------
MOUNTS=()
cleanup() {
  local m
  for m in "${MOUNTS[@]}"; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT

# Runs apt-get inside a rootfs with /proc mounted and service starts forbidden.
in_chroot() {
  local rootfs=$1; shift
  mount -t proc proc "$rootfs/proc"
  MOUNTS+=("$rootfs/proc")
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  local rc=0
  DEBIAN_FRONTEND=noninteractive LC_ALL=C chroot "$rootfs" "$@" || rc=$?
  rm -f "$rootfs/usr/sbin/policy-rc.d"
  umount "$rootfs/proc"
  MOUNTS=("${MOUNTS[@]/$rootfs\/proc/}")
  return $rc
}

slim_rootfs() {
  local r=$1
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
    "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old "$r"/tmp/* "$r"/var/tmp/* \
    "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/usr/share/groff/* "$r"/usr/share/lintian/* \
    "$r"/usr/share/linda/* "$r"/root/.bash_history
  find "$r"/usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete 2>/dev/null || true
  find "$r"/usr/share/doc -mindepth 1 -type d -empty -delete 2>/dev/null || true
  find "$r"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
  find "$r"/var/log -type f -delete
  : >"$r/etc/resolv.conf"
  printf '%s\n' "$(basename "$r")" >"$r/etc/hostname"
}

import_rootfs() {
  local rootfs=$1 tag=$2; shift 2
  log "docker import $tag"
  tar --numeric-owner --xattrs -C "$rootfs" \
    --exclude=./proc/* --exclude=./sys/* --exclude=./dev/* -cf - . |
    docker import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'LABEL io.weightinit.local-base=1' \
      --change "LABEL io.weightinit.debian-suite=$SUITE" \
      "$@" - "$tag" >/dev/null
}

# --- 1. runtime base ------------------------------------------------------
BASE_ROOTFS=$WORK/rootfs-$SUITE
need_base_rootfs() {
  [[ $FORCE == 1 ]] || ! have_image "$RUNTIME_IMAGE" || ! have_image "$RUST_IMAGE" || ! have_image "$NGINX_IMAGE"
}

make_base_rootfs() {
  command -v debootstrap >/dev/null || {
    log "installing debootstrap"
    apt-get install -y -qq debootstrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  }
  rm -rf "$BASE_ROOTFS"
  mkdir -p "$WORK/debcache" "$BASE_ROOTFS"
  log "debootstrap --variant=minbase $SUITE from $MIRROR"
  debootstrap --variant=minbase --arch="$ARCH" --cache-dir="$WORK/debcache" \
    "$SUITE" "$BASE_ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log: $WORK/debootstrap.log)"; }

  # The suite, its updates and its security fixes, from the same mirrors as the host.
  rm -f "$BASE_ROOTFS/etc/apt/sources.list"
  {
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\n' "$MIRROR" "$SUITE" "$SUITE"
    if [[ -n $SECURITY_MIRROR ]]; then
      printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\n' "$SECURITY_MIRROR" "$SUITE"
    fi
  } >"$BASE_ROOTFS/etc/apt/sources.list.d/debian.sources"
  # Like the official slim images: no docs or man pages from later installs,
  # no recommends, apt caches cleaned after each install.
  cat >"$BASE_ROOTFS/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  cat >"$BASE_ROOTFS/etc/apt/apt.conf.d/docker-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
EOF
  cp /etc/resolv.conf "$BASE_ROOTFS/etc/resolv.conf"
  log "apt-get upgrade ($SUITE-updates, $SUITE-security)"
  in_chroot "$BASE_ROOTFS" sh -c 'apt-get update -qq && apt-get -y -qq -o Dpkg::Use-Pty=0 upgrade' \
    >"$WORK/upgrade.log" 2>&1 || { tail -n 30 "$WORK/upgrade.log" >&2; die "upgrade failed"; }
  slim_rootfs "$BASE_ROOTFS"
}

# Copies the base rootfs and installs Debian packages into the copy.
derive_rootfs() {
  local name=$1; shift
  local r=$WORK/rootfs-$name
  rm -rf "$r"
  cp -a "$BASE_ROOTFS" "$r"
  cp /etc/resolv.conf "$r/etc/resolv.conf"
  log "apt-get install $* (into $name)"
  in_chroot "$r" sh -c "apt-get update -qq && apt-get install -y -qq -o Dpkg::Use-Pty=0 $*" \
    >"$WORK/install-$name.log" 2>&1 || { tail -n 30 "$WORK/install-$name.log" >&2; die "apt-get install into $name failed"; }
  slim_rootfs "$r"
  printf '%s\n' "$r"
}

T0=$SECONDS
if need_base_rootfs; then
  [[ $(id -u) == 0 ]] || die "run as root: making the base images needs debootstrap and chroot"
  make_base_rootfs
  log "base rootfs ready ($(du -sh "$BASE_ROOTFS" | cut -f1), $((SECONDS - T0)) s)"
fi

if [[ $FORCE == 1 ]] || ! have_image "$RUNTIME_IMAGE"; then
  import_rootfs "$BASE_ROOTFS" "$RUNTIME_IMAGE" --change 'CMD ["bash"]'
else
  log "$RUNTIME_IMAGE exists, kept"
fi

# --- 2. Rust builder -------------------------------------------------------
if [[ $FORCE == 1 ]] || ! have_image "$RUST_IMAGE"; then
  SYSROOT=$(rustc --print sysroot)
  [[ -x $SYSROOT/bin/cargo && -x $SYSROOT/bin/rustc ]] || die "no cargo/rustc in the active toolchain $SYSROOT"
  log "builder: host toolchain $SYSROOT ($(rustc --version))"
  r=$(derive_rootfs builder gcc libc6-dev pkg-config ca-certificates)
  mkdir -p "$r/usr/local/rust/bin" "$r/usr/local/cargo"
  cp -a "$SYSROOT/bin/cargo" "$SYSROOT/bin/rustc" "$SYSROOT/bin/rustdoc" "$r/usr/local/rust/bin/"
  # lib/ holds librustc_driver, LLVM, the std rlibs and rust-lld (the default linker).
  cp -a "$SYSROOT/lib" "$r/usr/local/rust/"
  rm -rf "$r/usr/local/rust/lib/rustlib/src" "$r/usr/local/rust/lib/rustlib/rustc-src"
  in_chroot "$r" /usr/local/rust/bin/rustc --version >/dev/null || die "the copied rustc does not run in the builder rootfs"
  import_rootfs "$r" "$RUST_IMAGE" \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL io.weightinit.rustc=$(rustc --version | awk '{print $2}')" \
    --change 'CMD ["bash"]'
  rm -rf "$r"
else
  log "$RUST_IMAGE exists, kept"
fi

# --- 3. nginx (gRPC load balancer for compose.yaml) -----------------------
if [[ $FORCE == 1 ]] || ! have_image "$NGINX_IMAGE"; then
  r=$(derive_rootfs nginx nginx)
  # Its config comes from deploy/nginx/nginx.conf (compose mounts it); logs go
  # to the container's stdout/stderr. (`docker import` cannot set STOPSIGNAL:
  # compose.yaml sets stop_signal SIGQUIT, nginx's graceful stop.)
  ln -sf /dev/stdout "$r/var/log/nginx/access.log"
  ln -sf /dev/stderr "$r/var/log/nginx/error.log"
  import_rootfs "$r" "$NGINX_IMAGE" \
    --change 'EXPOSE 50051' \
    --change 'CMD ["nginx", "-g", "daemon off;"]'
  rm -rf "$r"
else
  log "$NGINX_IMAGE exists, kept"
fi
rm -rf "$BASE_ROOTFS"

# --- 4. crates for an offline docker build -------------------------------
container_reaches_crates_io() {
  timeout 60 docker run --rm --network bridge "$RUST_IMAGE" \
    sh -c 'cargo search --limit 1 serde >/dev/null 2>&1' >/dev/null 2>&1
}

vendor_crates() {
  local stamp=$VENDOR_DIR/crates/.lock-sha256 want
  want=$(sha256sum "$ROOT/Cargo.lock" | cut -d' ' -f1)
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    log "vendored crates match Cargo.lock, kept"
    return
  fi
  log "cargo vendor --locked -> deploy/cargo-vendor/crates"
  rm -rf "$VENDOR_DIR/crates"
  (cd "$ROOT" && cargo vendor --locked --quiet "$VENDOR_DIR/crates" >/dev/null)
  printf '%s\n' "$want" >"$stamp"
  log "vendored $(find "$VENDOR_DIR/crates" -mindepth 1 -maxdepth 1 -type d | wc -l) crates ($(du -sh "$VENDOR_DIR/crates" | cut -f1))"
}

case $VENDOR in
  always) vendor_crates ;;
  never) log "VENDOR=never: the docker build fetches crates from crates.io" ;;
  auto)
    if [[ -d $VENDOR_DIR/crates ]]; then
      vendor_crates # decided before; keep it in step with Cargo.lock
    elif container_reaches_crates_io; then
      log "containers reach crates.io: no vendoring needed"
    else
      log "containers cannot reach crates.io: vendoring on the host"
      vendor_crates
    fi
    ;;
  *) die "VENDOR must be auto, always or never" ;;
esac

log "base images ready in $((SECONDS - T0)) s"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^($RUNTIME_IMAGE|$RUST_IMAGE|$NGINX_IMAGE) " >&2 || true

# --- 5. the image (--build) ------------------------------------------------
# The classic builder keeps the builder stage's last image, untagged: it is the
# build cache. It is removed (with its untagged parents) unless KEEP_BUILD_CACHE=1.
BUILD_CACHE_TAG=weightinit-build-cache:local
build_image() {
  local t0=$SECONDS build_log=$WORK/docker-build.log builder_id
  log "docker build -t $BUILD_TAG (RUST_IMAGE=$RUST_IMAGE RUNTIME_IMAGE=$RUNTIME_IMAGE; log: $build_log)"
  docker build --force-rm --build-arg "RUST_IMAGE=$RUST_IMAGE" \
    --build-arg "RUNTIME_IMAGE=$RUNTIME_IMAGE" -t "$BUILD_TAG" "$ROOT" 2>&1 | tee "$build_log" ||
    die "docker build failed (log: $build_log)"
  # The image id printed just before the second FROM (the runtime stage).
  builder_id=$(awk '/^Step [0-9]+\/[0-9]+ : FROM / && ++n == 2 { print prev; exit } /^ ---> [0-9a-f]+$/ { prev = $2 }' \
    "$build_log")
  if [[ ${KEEP_BUILD_CACHE:-0} == 1 && -n $builder_id ]]; then
    docker tag "$builder_id" "$BUILD_CACHE_TAG"
    log "builder stage kept as $BUILD_CACHE_TAG (docker rmi $BUILD_CACHE_TAG frees it)"
  else
    docker image rm "$BUILD_CACHE_TAG" >/dev/null 2>&1 || true
  fi
  # Untagged builder stages (this build's unless kept, and any left by plain builds).
  docker image prune -f --filter label=io.weightinit.stage=builder >/dev/null
  log "built $BUILD_TAG in $((SECONDS - t0)) s ($(docker image inspect -f '{{.Size}}' "$BUILD_TAG" | awk '{printf "%.0f MB", $1 / 1e6}'))"
  log "run it: docker run --rm -p 127.0.0.1:50052:50051 --read-only --cap-drop ALL $BUILD_TAG"
}
if [[ -n $BUILD_TAG ]]; then
  build_image
fi
