//! Secretless Broker's own configurations (`tests/corpus/secretless/`, collected from
//! cyberark/secretless-broker by `tests/scripts/collect-secretless-corpus`, provenance in
//! `PROVENANCE.md`, verdicts in `expected.tsv`) through `broker check`:
//!
//! - `ok` (Secretless loads and starts it): exit 0, or every error names a connector or
//!   provider that "is not built yet";
//! - `invalid` (Secretless rejects it): a non-zero exit, no panic;
//! - `plugin` (a Go plugin connector): a non-zero exit naming the connector;
//! - `crd` (a Kubernetes `Configuration` object): reported as unsupported by kind, in a
//!   test of its own;
//! - `template` (placeholders to fill in first): no panic.
//!
//! No output may quote a literal credential value of the file. A failure prints every
//! failing file with its error lines, then the error lines grouped by cause.
//! Not privileged: `check` needs no root.

use std::{
    collections::BTreeMap,
    fs::File,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use broker_tests::{broker_bin, workspace_root};
use yaml_serde::Value;

/// How long one `broker check` may take (the generated pg/mysql fixtures hold 5122
/// services each).
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);

/// Credential names whose values are addresses and TLS settings, not secrets: check may
/// well echo a hostname in another context (a listenOn, a service name).
const NOT_SECRET: &[&str] = &[
    "host",
    "port",
    "address",
    "sslmode",
    "sslhost",
    "sslrootcert",
    "sslcert",
    "sslkey",
];

struct Entry {
    file: String,
    expected: String,
    source: String,
}

fn corpus_dir() -> PathBuf {
    workspace_root().join("tests/corpus/secretless")
}

fn corpus() -> Vec<Entry> {
    let tsv = corpus_dir().join("expected.tsv");
    let text = std::fs::read_to_string(&tsv).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run tests/scripts/collect-secretless-corpus)",
            tsv.display()
        )
    });
    let entries: Vec<Entry> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut f = l.split('\t');
            let (Some(file), Some(expected), Some(source)) = (f.next(), f.next(), f.next()) else {
                panic!("{}: malformed line {l:?}", tsv.display());
            };
            assert!(
                ["ok", "invalid", "crd", "plugin", "template"].contains(&expected),
                "{}: unknown verdict {expected:?} for {file}",
                tsv.display()
            );
            assert!(
                corpus_dir().join(file).is_file(),
                "{}: {file} is listed but missing",
                tsv.display()
            );
            Entry {
                file: file.to_owned(),
                expected: expected.to_owned(),
                source: source.to_owned(),
            }
        })
        .collect();
    assert!(
        entries.len() >= 50,
        "corpus too small: {} files",
        entries.len()
    );
    entries
}

/// The file's text (`.gz` files are the generated pg/mysql fixtures).
fn text_of(e: &Entry) -> String {
    let path = corpus_dir().join(&e.file);
    if e.file.ends_with(".gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(File::open(&path).expect("open corpus file"))
            .read_to_string(&mut s)
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        s
    } else {
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
    }
}

struct Checked {
    /// None: killed by a signal.
    code: Option<i32>,
    /// stdout then stderr, with the file's path replaced by its corpus name.
    out: String,
}

/// `broker check <file>` with an empty environment (so no ambient VAULT_ADDR etc.),
/// bounded by [`CHECK_TIMEOUT`]; output goes to files so a long report cannot block it.
fn check(e: &Entry, dir: &Path) -> Checked {
    let name = e.file.trim_end_matches(".gz");
    let path = dir.join(name);
    std::fs::write(&path, text_of(e)).expect("write corpus file");
    let out_path = dir.join(format!("{name}.out"));
    let err_path = dir.join(format!("{name}.err"));
    let mut child = Command::new(broker_bin())
        .arg("check")
        .arg(&path)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("create stdout file"))
        .stderr(File::create(&err_path).expect("create stderr file"))
        .spawn()
        .expect("spawn broker check");
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("broker check {} took more than {CHECK_TIMEOUT:?}", e.file);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = format!(
        "{}{}",
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default()
    )
    .replace(path.to_str().expect("UTF-8 temp path"), name);
    Checked {
        code: status.code(),
        out,
    }
}

/// The lines that are errors: not the OK summary, not warnings.
fn error_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| !l.trim().is_empty() && !l.contains(": OK: ") && !l.contains(": warning: "))
        .collect()
}

fn panicked(c: &Checked) -> bool {
    c.code.is_none() || c.code == Some(101) || c.out.contains("panicked at")
}

fn yaml(e: &Entry) -> Option<Value> {
    yaml_serde::from_str(&text_of(e)).ok()
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_mapping()?.get(key)
}

/// Literal credential values (v2 `name: value` / `{from: literal, get: value}`; v1 and
/// CRD `{provider: literal, id: value}`), except addresses and TLS settings, and except
/// values that are part of a service's name (the key path names the service).
fn literal_secrets(e: &Entry) -> Vec<String> {
    let Some(doc) = yaml(e) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    let mut found = Vec::new();
    if let Some(services) = get(&doc, "services").and_then(Value::as_mapping) {
        for (name, svc) in services {
            names.extend(scalar(name));
            let Some(creds) = get(svc, "credentials").and_then(Value::as_mapping) else {
                continue;
            };
            for (cname, cv) in creds {
                let cname = scalar(cname).unwrap_or_default();
                let value = match cv {
                    Value::Mapping(_) => match get(cv, "from").and_then(scalar).as_deref() {
                        Some("literal") => get(cv, "get").and_then(scalar),
                        _ => None,
                    },
                    other => scalar(other),
                };
                if let Some(v) = value {
                    found.push((cname, v));
                }
            }
        }
    }
    let v1 = get(&doc, "spec").unwrap_or(&doc);
    for h in get(v1, "handlers")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        names.extend(get(h, "name").and_then(scalar));
        for c in get(h, "credentials")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            if get(c, "provider").and_then(scalar).as_deref() == Some("literal")
                && let (Some(n), Some(v)) = (
                    get(c, "name").and_then(scalar),
                    get(c, "id").and_then(scalar),
                )
            {
                found.push((n, v));
            }
        }
    }
    let mut secrets: Vec<String> = found
        .into_iter()
        .filter(|(n, v)| {
            !NOT_SECRET.contains(&n.as_str())
                && v.len() >= 4
                && !names.iter().any(|s| s.contains(v.as_str()))
                && !e.file.contains(v.as_str())
        })
        .map(|(_, v)| v)
        .collect();
    secrets.sort();
    secrets.dedup();
    secrets
}

/// Connector names a file asks for (`connector:` or `protocol:` of its services).
fn connectors(e: &Entry) -> Vec<String> {
    let Some(doc) = yaml(e) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (_, svc) in get(&doc, "services")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
    {
        if let Some(c) = get(svc, "connector")
            .or_else(|| get(svc, "protocol"))
            .and_then(scalar)
        {
            out.push(c);
        }
    }
    out
}

/// An error line reduced to its cause: service and credential names, quoted values and
/// numbers replaced, so the same problem in many files counts as one.
fn cause(line: &str) -> String {
    let msg = line.split_once(": ").map_or(line, |(_, rest)| rest);
    let (path, rest) = msg.split_once(": ").unwrap_or((msg, ""));
    let segs: Vec<&str> = path.split('.').collect();
    let path: Vec<&str> = segs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if i > 0 && (segs[i - 1] == "services" || segs[i - 1] == "credentials") {
                "*"
            } else {
                s
            }
        })
        .collect();
    let rest = rest.split(" (expected one of").next().unwrap_or(rest);
    let rest = rest.split(" (known: ").next().unwrap_or(rest);
    let rest: Vec<String> = rest
        .split(' ')
        .map(|w| {
            let bare = w.trim_matches('"');
            if bare.starts_with("unix://") || bare.starts_with("tcp://") {
                format!("{}://...", bare.split("://").next().unwrap_or(""))
            } else {
                w.to_owned()
            }
        })
        .collect();
    format!("{}: {}", path.join("."), rest.join(" "))
}

struct Failures {
    what: &'static str,
    files: Vec<String>,
    causes: BTreeMap<String, (usize, Vec<String>)>,
}

impl Failures {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            files: Vec::new(),
            causes: BTreeMap::new(),
        }
    }

    fn add(&mut self, e: &Entry, why: &str, lines: &[&str]) {
        let mut shown: Vec<&str> = lines.iter().copied().take(8).collect();
        if lines.len() > 8 {
            shown.push("...");
        }
        self.files.push(format!(
            "{} ({}; {why}):\n    {}",
            e.file,
            e.source,
            shown.join("\n    ")
        ));
        for l in lines {
            let c = self.causes.entry(cause(l)).or_default();
            c.0 += 1;
            if !c.1.contains(&e.file) {
                c.1.push(e.file.clone());
            }
        }
    }

    fn assert_none(self, total: usize) {
        if self.files.is_empty() {
            return;
        }
        let mut by_count: Vec<_> = self.causes.into_iter().collect();
        by_count.sort_by(|a, b| {
            (b.1.1.len(), b.1.0)
                .cmp(&(a.1.1.len(), a.1.0))
                .then(a.0.cmp(&b.0))
        });
        let grouped: Vec<String> = by_count
            .iter()
            .map(|(c, (n, files))| {
                let ex: Vec<&str> = files.iter().take(2).map(String::as_str).collect();
                format!("  {:>3} {n:>6}  {c}   e.g. {}", files.len(), ex.join(", "))
            })
            .collect();
        panic!(
            "{} of {total} {} files fail:\n\n{}\n\nerror lines by cause (files, lines, cause, examples):\n{}",
            self.files.len(),
            self.what,
            self.files.join("\n"),
            grouped.join("\n")
        );
    }
}

fn run(verdict: &str) -> Vec<(Entry, Checked)> {
    let dir = tempfile::tempdir().expect("tempdir");
    corpus()
        .into_iter()
        .filter(|e| e.expected == verdict)
        .map(|e| {
            let c = check(&e, dir.path());
            (e, c)
        })
        .collect()
}

fn secret_leaks(e: &Entry, out: &str) -> Vec<String> {
    literal_secrets(e)
        .into_iter()
        .filter(|s| out.contains(s.as_str()))
        .map(|s| {
            format!(
                "output quotes a literal credential value (length {})",
                s.len()
            )
        })
        .collect()
}

/// Every configuration Secretless accepts loads, or fails only on connectors and
/// providers not built yet; no output quotes a credential value.
#[test]
fn secretless_configs_load_or_name_what_is_not_built() {
    let checked = run("ok");
    let mut f = Failures::new("ok");
    for (e, c) in &checked {
        let errors = error_lines(&c.out);
        let leaks = secret_leaks(e, &c.out);
        if panicked(c) {
            f.add(e, "panicked", &errors);
        } else if c.code != Some(0) {
            let bad: Vec<&str> = errors
                .iter()
                .copied()
                .filter(|l| !l.contains("is not built yet"))
                .collect();
            if !bad.is_empty() || errors.is_empty() {
                f.add(e, &format!("exit {:?}", c.code), &bad);
            }
        }
        if !leaks.is_empty() {
            f.add(
                e,
                "secret in output",
                &leaks.iter().map(String::as_str).collect::<Vec<_>>(),
            );
        }
    }
    f.assert_none(checked.len());
}

/// What Secretless rejects is rejected too, without a panic or a quoted secret.
#[test]
fn secretless_rejects_are_rejected_without_panic() {
    let checked = run("invalid");
    let mut f = Failures::new("invalid");
    for (e, c) in &checked {
        let errors = error_lines(&c.out);
        if panicked(c) {
            f.add(e, "panicked", &errors);
        } else if c.code == Some(0) {
            f.add(e, "accepted", &[c.out.trim()]);
        }
        let leaks = secret_leaks(e, &c.out);
        if !leaks.is_empty() {
            f.add(
                e,
                "secret in output",
                &leaks.iter().map(String::as_str).collect::<Vec<_>>(),
            );
        }
    }
    f.assert_none(checked.len());
}

/// A Go plugin connector is refused by name.
#[test]
fn secretless_plugin_connectors_are_named() {
    let checked = run("plugin");
    assert!(!checked.is_empty(), "no plugin file in the corpus");
    let mut f = Failures::new("plugin");
    for (e, c) in &checked {
        let errors = error_lines(&c.out);
        let names = connectors(e);
        if panicked(c) {
            f.add(e, "panicked", &errors);
        } else if c.code == Some(0) {
            f.add(e, "accepted", &[c.out.trim()]);
        } else if !names.iter().any(|n| c.out.contains(n.as_str())) {
            f.add(e, &format!("does not name {names:?}"), &errors);
        }
    }
    f.assert_none(checked.len());
}

/// Placeholders to fill in: whatever check says, it does not panic.
#[test]
fn secretless_templates_do_not_panic() {
    let checked = run("template");
    let mut f = Failures::new("template");
    for (e, c) in &checked {
        if panicked(c) {
            f.add(e, "panicked", &error_lines(&c.out));
        }
    }
    f.assert_none(checked.len());
}

/// A Kubernetes `Configuration` object (Secretless' k8s/crd config manager) is reported
/// as unsupported by its kind, not as a list of unknown keys.
#[test]
fn secretless_crd_objects_are_reported_as_unsupported() {
    let checked = run("crd");
    assert!(!checked.is_empty(), "no crd file in the corpus");
    let mut f = Failures::new("crd");
    for (e, c) in &checked {
        let errors = error_lines(&c.out);
        let lower = c.out.to_lowercase();
        if panicked(c) {
            f.add(e, "panicked", &errors);
        } else if c.code == Some(0) {
            f.add(e, "accepted", &[c.out.trim()]);
        } else if !(c.out.contains("Configuration")
            && (lower.contains("not supported") || lower.contains("unsupported")))
        {
            f.add(
                e,
                "not reported as an unsupported Kubernetes Configuration object",
                &errors,
            );
        }
        let leaks = secret_leaks(e, &c.out);
        if !leaks.is_empty() {
            f.add(
                e,
                "secret in output",
                &leaks.iter().map(String::as_str).collect::<Vec<_>>(),
            );
        }
    }
    f.assert_none(checked.len());
}

/// The corpus and its table agree: every file listed, every listed file present, and
/// the pg fixtures Secretless' own pg suite generates are there.
#[test]
fn secretless_corpus_is_complete() {
    let entries = corpus();
    let listed: Vec<&str> = entries.iter().map(|e| e.file.as_str()).collect();
    for p in std::fs::read_dir(corpus_dir()).expect("corpus dir") {
        let name = p
            .expect("dir entry")
            .file_name()
            .into_string()
            .expect("UTF-8 name");
        if name.ends_with(".yml") || name.ends_with(".yml.gz") {
            assert!(
                listed.contains(&name.as_str()),
                "{name} is not in expected.tsv"
            );
        }
    }
    for must in [
        "demos__quick-start__docker__etc__secretless.yml",
        "demos__k8s-demo__etc__secretless.yml",
        "test__connector__tcp__pg__fixtures__secretless.yml.gz",
    ] {
        assert!(listed.contains(&must), "{must} missing from the corpus");
    }
    let pg = entries
        .iter()
        .find(|e| e.file == "test__connector__tcp__pg__fixtures__secretless.yml.gz")
        .expect("pg fixtures");
    let doc = yaml(pg).expect("pg fixtures parse");
    let services = get(&doc, "services")
        .and_then(Value::as_mapping)
        .expect("services");
    // 2 TLS settings x 2 socket types x 5 sslmodes x 2 sslhosts x 4 x 4 x 4 cert/key
    // states x 2 password validities, plus health-check and pg-bench.
    assert_eq!(services.len(), 5122);
}

/// The secret grep has something to grep for: literal values of v2 (plain and
/// `from: literal`), v1 and CRD files are collected, addresses are not.
#[test]
fn secretless_literal_credentials_are_collected() {
    let entries = corpus();
    let find = |name: &str| {
        let e = entries
            .iter()
            .find(|e| e.file == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        literal_secrets(e)
    };
    assert_eq!(
        find("test__connector__http__basicauth__secretless.yml"),
        ["notthecorrectpassword", "someuser", "testpassword"]
    );
    // health-check's `testpass` and `testuser` yes; `health-check` (also a service
    // name), `pg` (a host) and `test` (part of the file's name) no.
    assert_eq!(
        find("test__connector__tcp__pg__fixtures__secretless.dev.yml"),
        ["testpass", "testuser"]
    );
    assert!(
        find("resource-definitions__sbconfig-example.yaml.yml")
            .contains(&"somepassword".to_owned())
    );
    assert!(find("design__simpler-configuration.md.1.yml").contains(&"testpassword".to_owned()));
    let mysql = find("test__connector__tcp__mysql__fixtures__secretless.dev.yml");
    assert!(mysql.contains(&"testpass".to_owned()), "{mysql:?}");
}
