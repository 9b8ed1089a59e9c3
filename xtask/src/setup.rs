//! `cargo xtask setup`: make a fresh machine able to build and test, idempotently.
//!
//! * the nightly toolchain with `rust-src` (the eBPF crate builds core for the BPF target);
//! * `bpf-linker`, built against the nightly toolchain's own libLLVM (no prebuilt binary
//!   and no Debian LLVM matches; see REFERENCE.md section 1);
//! * the Debian packages the tests and benchmarks use.
//!
//! Each step checks first and does nothing when already satisfied.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::run;

/// Debian packages: servers and clients the tests start, tools they call.
const PACKAGES: &[&str] = &[
    "postgresql",
    "postgresql-client",
    "bpftool",
    "haproxy",
    "pgbouncer",
    "netcat-openbsd",
    "iproute2",
    "util-linux",
    "openssl",
    "curl",
    "procps",
    "python3",
    "python3-psycopg2",
];

pub fn all() -> anyhow::Result<()> {
    nightly()?;
    bpf_linker()?;
    packages()?;
    Ok(())
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let o = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?} failed: {}", o.status);
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn nightly() -> anyhow::Result<()> {
    if !quiet_ok(Command::new("rustc").args(["+nightly", "--version"])) {
        eprintln!("setup: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"),
        PathBuf::from,
    )
}

fn bpf_linker() -> anyhow::Result<()> {
    let bin = cargo_home().join("bin/bpf-linker");
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    // bpf-linker links nightly's libLLVM dynamically; rustc runs it with the toolchain's
    // lib dir on the library path, so check it the same way.
    if quiet_ok(
        Command::new(&bin)
            .arg("--version")
            .env("LD_LIBRARY_PATH", &libdir),
    ) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker against nightly's libLLVM (about 75 s on 2 cores)");
    let llvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
            })
        })
        .with_context(|| format!("no libLLVM in {}", libdir.display()))?;
    let version = output(Command::new("rustc").args(["+nightly", "--version", "--verbose"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("nightly rustc does not report its LLVM version")?
        .to_owned();
    let prefix = std::env::temp_dir().join(format!("broker-llvm-{major}"));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("linking {} -> {}", link.display(), llvm.display()))?;
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut c)
    };
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    if apt(&install).is_err() {
        // Stale package lists (404s) on a fresh machine: refresh once and retry.
        apt(&["update", "-q"])?;
        apt(&install)?;
    }
    // Debian starts the packaged services; the tests start their own instances.
    for svc in ["postgresql", "haproxy", "pgbouncer"] {
        let _ = Command::new("service")
            .args([svc, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    Ok(())
}
