//! `cargo xtask setup`: make a fresh machine able to build and test, idempotently.
//!
//! * the nightly toolchain with `rust-src` (the eBPF crate builds core for the BPF target);
//! * `bpf-linker`, built against the nightly toolchain's own libLLVM (no prebuilt binary
//!   and no Debian LLVM matches; see REFERENCE.md section 1);
//! * the Debian packages the tests and benchmarks use;
//! * the database clients Debian lacks (pg8000, MySQL Connector/Python, node-postgres),
//!   moto's AWS server (the `aws` provider's tests) and prometheus-client (the metrics
//!   test's exposition parser), pinned, into `target/clients/` with pip and npm (see
//!   `broker_tests::clients`).
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
    // The real SigV4 verifier the signer is checked against.
    "python3-botocore",
    // The real OAuth 1.0a verifier (tests/tests/http_proxy.rs).
    "python3-oauthlib",
    // The real-client matrix (tests/tests/pg_clients.rs) and `bench clients`.
    "python3-asyncpg",
    "python3-pip",
    "default-jdk-headless",
    "libpostgresql-jdbc-java",
    // `bench http`: the load generator, and the origin and peer reverse proxy.
    "wrk",
    "nginx",
    // The mysql connector's tests (tests/tests/mysql.rs): a real server, its CLI, PyMySQL
    // (with cryptography for caching_sha2_password's RSA exchange).
    "mariadb-server",
    "mariadb-client",
    "python3-pymysql",
    "python3-cryptography",
    // Packaging checks (tests/tests/packaging.rs): `systemd-analyze verify` and
    // `security` of the unit, and strace for the system calls its filter must allow.
    "systemd",
    "strace",
    // `bench all`'s chart: the font its labels are drawn with (plotters' ab_glyph).
    "fonts-dejavu-core",
];

pub fn all() -> anyhow::Result<()> {
    nightly()?;
    bpf_linker()?;
    packages()?;
    node()?;
    client_libraries()?;
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
    apt_install(&missing)?;
    // Debian starts the packaged services; the tests start their own instances.
    for svc in ["postgresql", "haproxy", "pgbouncer", "nginx", "mariadb"] {
        let _ = Command::new("service")
            .args([svc, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    Ok(())
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    eprintln!("setup: installing Debian packages: {}", packages.join(" "));
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut c)
    };
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(packages);
    if apt(&install).is_err() {
        // Stale package lists (404s) on a fresh machine: refresh once and retry.
        apt(&["update", "-q"])?;
        apt(&install)?;
    }
    Ok(())
}

/// `node` and `npm` (node-postgres' client and installer): Debian's `nodejs` and `npm`
/// when missing. A NodeSource `nodejs` bundles npm (and conflicts with Debian's `npm`).
fn node() -> anyhow::Result<()> {
    let have = |cmd: &str| quiet_ok(Command::new(cmd).arg("--version"));
    if have("node") && have("npm") {
        return Ok(());
    }
    let want: &[&str] = if have("node") {
        &["npm"]
    } else {
        &["nodejs", "npm"]
    };
    apt_install(want).context(
        "installing Debian's npm (a NodeSource nodejs conflicts with it: it bundles its own npm)",
    )
}

/// pg8000, MySQL Connector/Python, moto's AWS server and prometheus-client (PyPI),
/// node-postgres with pg-copy-streams (npm), at the pinned versions, into
/// `target/clients/{python,node}`; nothing when those versions are there.
fn client_libraries() -> anyhow::Result<()> {
    use broker_tests::clients::{NPM_PACKAGES, PIP_PACKAGES, PYTHON, node_deps, python_deps};
    let py = python_deps();
    let py_ok = PIP_PACKAGES.iter().all(|(name, version)| {
        std::fs::read_dir(&py).is_ok_and(|entries| {
            // Wheels name the directory after the normalized project name
            // (`mysql_connector_python-9.4.0.dist-info`).
            // Extras (`moto[server]`) are not part of it.
            let project = name.split('[').next().unwrap_or(name);
            let want = format!("{}-{version}.dist-info", project.replace('-', "_"));
            entries.filter_map(Result::ok).any(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(&want))
            })
        })
    });
    if !py_ok {
        eprintln!("setup: pip install {PIP_PACKAGES:?} into {}", py.display());
        let _ = std::fs::remove_dir_all(&py);
        std::fs::create_dir_all(&py)?;
        run(Command::new(PYTHON)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
                "--no-warn-script-location",
                "--target",
            ])
            .arg(&py)
            .args(PIP_PACKAGES.iter().map(|(n, v)| format!("{n}=={v}"))))?;
    }
    let node = node_deps();
    let node_ok = NPM_PACKAGES.iter().all(|(name, version)| {
        std::fs::read_to_string(node.join("node_modules").join(name).join("package.json"))
            .is_ok_and(|text| text.contains(&format!("\"version\": \"{version}\"")))
    });
    if !node_ok {
        eprintln!(
            "setup: npm install {NPM_PACKAGES:?} into {}",
            node.display()
        );
        let _ = std::fs::remove_dir_all(&node);
        std::fs::create_dir_all(&node)?;
        run(Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(&node)
            .args(NPM_PACKAGES.iter().map(|(n, v)| format!("{n}@{v}"))))?;
    }
    Ok(())
}
