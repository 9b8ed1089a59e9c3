# syntax=docker/dockerfile:1
#
# The broker's container image: built with the workspace's toolchains (stable Rust for
# the daemon; a pinned nightly and bpf-linker for the kernel programs, which the build
# embeds in the binary), shipped as the binary alone on distroless (glibc, CA
# certificates, no shell, no package manager).
#
#   docker build -t broker:dev .
#   docker run --rm broker:dev version
#
# It starts as Secretless Broker's image does: `args: ["-f", "/etc/secretless/secretless.yml"]`
# runs `broker -f FILE`; the default command is `broker run -f /etc/broker/broker.yaml`.
# Loading the programs needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON: run it privileged
# (Kubernetes manifests: deploy/kubernetes/). See docs/OPERATIONS.md, "Packaging".

ARG RUST_VERSION=1.95
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:latest

FROM rust:${RUST_VERSION}-bookworm AS build
# The nightly the kernel programs are built and verified with, its LLVM major, and the
# bpf-linker built against that nightly's own libLLVM (what `cargo xtask setup` does on
# a host: no prebuilt bpf-linker and no Debian LLVM match it). aya-build runs
# `rustup run nightly`: the pinned toolchain is linked under that name.
ARG NIGHTLY=nightly-2026-05-19
ARG LLVM_MAJOR=22
ARG BPF_LINKER_VERSION=0.13.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN rustup toolchain install "${NIGHTLY}" --profile minimal --component rust-src \
 && host="$(rustc -vV | sed -n 's/^host: //p')" \
 && ln -s "${NIGHTLY}-${host}" "${RUSTUP_HOME}/toolchains/nightly-${host}" \
 && llvm="$(find "$(rustc +nightly --print sysroot)/lib" -maxdepth 1 -name 'libLLVM.so.*' -print -quit)" \
 && test -n "${llvm}" \
 && mkdir -p /opt/llvm/lib \
 && ln -s "${llvm}" /opt/llvm/lib/libLLVM.so \
 && LLVM_PREFIX=/opt/llvm cargo install bpf-linker --version "${BPF_LINKER_VERSION}" \
      --no-default-features --features "llvm-${LLVM_MAJOR}"

WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p broker-userspace \
 && install -D -m 0755 target/release/broker /out/broker \
 && strip --strip-debug /out/broker \
 && /out/broker version

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/broker /usr/local/bin/broker
# The health endpoint, when started with --health-addr 0.0.0.0:5335 (probes).
EXPOSE 5335
ENTRYPOINT ["/usr/local/bin/broker"]
CMD ["run", "-f", "/etc/broker/broker.yaml"]
