# weightinit: a gRPC service that hands distributed trainers byte-identical
# initial weights.
#
# Build, on a machine without an image registry (as root; makes the base images
# when they are missing, then this build, and removes the builder stage):
#   deploy/make-base-images.sh --build            # -> weightinit:local
# Build, where the base images can be pulled:
#   docker build -t weightinit:local .
#   docker image prune -f --filter label=io.weightinit.stage=builder
# (the classic builder keeps the builder stage, ~1.9 GB, as an untagged image;
# the prune removes it, and with it the cache of the next build).
# Run (host port 50052, so that a server on 50051 can keep running):
#   docker run --rm -p 127.0.0.1:50052:50051 --read-only --cap-drop ALL weightinit:local
# See deploy/README.md for compose, Kubernetes and how the base images are made.

# Base images are build arguments with the usual public defaults.
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------- builder ---
FROM ${RUST_IMAGE} AS builder
# Marks the build cache, so that deploy/lib.sh can prune stale copies of it.
LABEL io.weightinit.stage=builder
WORKDIR /usr/src/weightinit

# Crates vendored on the host by deploy/make-base-images.sh, used when present
# (the build is then offline); without them cargo fetches from crates.io.
COPY deploy/cargo-vendor/ /opt/cargo-vendor/
RUN if [ -d /opt/cargo-vendor/crates ]; then \
        mkdir -p "${CARGO_HOME:-$HOME/.cargo}" \
        && printf '%s\n' \
            '[source.crates-io]' 'replace-with = "vendored-sources"' \
            '[source.vendored-sources]' 'directory = "/opt/cargo-vendor/crates"' \
            '[net]' 'offline = true' \
            > "${CARGO_HOME:-$HOME/.cargo}/config.toml" \
        && echo "using vendored crates"; \
    else \
        echo "no vendored crates: fetching from crates.io"; \
    fi

# Only the library and binaries go into the image: the manifest's [[bench]],
# [[test]] and [[example]] targets (whose files are not copied) are dropped
# from the build's copy of Cargo.toml. Dependencies and the lock are unchanged.
COPY Cargo.toml Cargo.lock ./
RUN awk '/^[[:space:]]*\[\[(bench|test|example)\]\]/ { skip = 1; next } /^[[:space:]]*\[/ { skip = 0 } !skip' \
        Cargo.toml > Cargo.toml.build \
    && mv Cargo.toml.build Cargo.toml
COPY crates/engine/Cargo.toml crates/engine/
COPY crates/proto/Cargo.toml crates/proto/
COPY crates/service/Cargo.toml crates/service/
COPY crates/client/Cargo.toml crates/client/
# The Python extension is a workspace member, not part of the image: its manifest only lets
# cargo load the workspace.
COPY crates/python/Cargo.toml crates/python/

# Dependencies first, against stub sources, so that a change in the sources only
# rebuilds the workspace's own crates. A failure here is reported by the real build below.
RUN for crate in . crates/engine crates/proto crates/service crates/client crates/python; do \
        mkdir -p "$crate/src" && touch "$crate/src/lib.rs"; \
    done \
    && echo 'fn main() {}' > src/main.rs \
    && { cargo build --release --locked -p weightinit || echo "dependency pre-build failed; see the full build"; } \
    && rm -rf src crates/*/src

COPY proto/ proto/
COPY src/ src/
COPY crates/ crates/
# Forget the stubs' fingerprints so the real sources are always compiled.
RUN rm -rf target/release/.fingerprint/weightinit-* \
    && cargo build --release --locked -p weightinit \
    && install -D -m 0755 target/release/weightinit /out/weightinit \
    && /out/weightinit --help > /dev/null

# ---------------------------------------------------------------- runtime ---
FROM ${RUNTIME_IMAGE}
ARG UID=10001
LABEL org.opencontainers.image.title="weightinit" \
      org.opencontainers.image.description="gRPC service that hands distributed trainers byte-identical initial weights" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid "${UID}" weightinit \
    && useradd --system --no-log-init --uid "${UID}" --gid weightinit --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin weightinit
COPY --from=builder /out/weightinit /usr/local/bin/weightinit

# Numeric so that Kubernetes' runAsNonRoot can verify it.
USER ${UID}:${UID}
ENV WEIGHTINIT_ADDR=0.0.0.0:50051 \
    WEIGHTINIT_SHUTDOWN_GRACE=30s
EXPOSE 50051
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/weightinit", "healthcheck"]
# SIGTERM: health goes NOT_SERVING, new connections are refused, streams in
# flight finish within WEIGHTINIT_SHUTDOWN_GRACE, exit 0. Stop with a timeout
# above that grace: docker stop -t 40.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/weightinit"]
CMD ["serve"]
