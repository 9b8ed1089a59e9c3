//! Builds the kernel programs (`broker-ebpf`) for the BPF target with the nightly
//! toolchain and bpf-linker (installed by `cargo xtask setup`), so that `cargo build`
//! produces one `broker` binary with the eBPF object embedded.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("broker-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    println!("cargo:rerun-if-changed=../broker-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "broker-ebpf",
            root_dir,
            no_default_features: false,
            features: &[],
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed; run `cargo xtask setup` to install nightly rust-src and bpf-linker",
    )
}
