//! `broker check`: every malformed config is reported with its key path, in one run; the
//! user's seed configs and a Secretless v2 file load as written, with not-built
//! connectors and providers named.

use std::path::PathBuf;

use broker_tests::{assert_no_secret, broker_check, output_text, workspace_root, write_file};

/// Run check on `text`; return (exit code, output).
fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write_file(dir.path(), "broker.yaml", text);
    let out = broker_check(&p, &[]);
    (out.status.code().unwrap_or(-1), output_text(&out))
}

fn assert_reports(text: &str, needles: &[&str]) -> String {
    let (code, out) = check(text);
    assert_ne!(code, 0, "check accepted a bad config:\n{text}\n{out}");
    for n in needles {
        assert!(out.contains(n), "expected {n:?} in:\n{out}");
    }
    out
}

#[test]
fn valid_config_passes() {
    let (code, out) = check(
        "version: 2\nservices:\n  db:\n    connector: pg\n    intercept: [db.example.com:5432, 10.0.0.0/24:5432, \"[2001:db8::/64]:5432\"]\n    credentials:\n      username: app\n      password: {from: env, get: DB_PASSWORD}\n    config:\n      upstreamAllow: [10.0.0.0/24, \"2001:db8::/64\"]\n",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK"), "{out}");
}

#[test]
fn bad_yaml_names_the_line() {
    let out = assert_reports("version: 2\nservices:\n  db: [unclosed\n", &["broker.yaml"]);
    assert!(out.contains("line"), "{out}");
}

#[test]
fn unknown_key_is_named_with_its_path() {
    assert_reports(
        "version: 2\nservices:\n  db:\n    connector: tcp\n    intercept: [\"10.0.0.1:80\"]\n    conifg: {}\n",
        &["services.db", "conifg"],
    );
}

#[test]
fn unknown_provider_is_named() {
    assert_reports(
        "version: 2\nservices:\n  db:\n    connector: tcp\n    intercept: [\"10.0.0.1:80\"]\n    credentials:\n      password: {from: nosuchstore, get: x}\n",
        &["services.db.credentials.password", "nosuchstore"],
    );
}

#[test]
fn bad_cidr_is_named() {
    assert_reports(
        "version: 2\nservices:\n  db:\n    connector: tcp\n    intercept: [\"10.0.0.0/33:5432\"]\n",
        &["services.db.intercept[0]"],
    );
}

#[test]
fn missing_credential_is_named() {
    assert_reports(
        "version: 2\nservices:\n  db:\n    connector: pg\n    intercept: [\"10.0.0.1:5432\"]\n    credentials:\n      username: app\n",
        &["services.db.credentials", "password"],
    );
}

#[test]
fn every_error_in_one_run_and_no_secret_echoed() {
    let out = assert_reports(
        "version: 2\nservices:\n  a:\n    connector: tcp\n    intercept: [\"10.0.0.0/40:1\"]\n    credentials:\n      password: hunter2-literal-secret\n      token: {from: nope, get: x}\n  b:\n    connector: warp\n    listenOn: tcp://127.0.0.1:1\n    extra: 1\n",
        &[
            "services.a.intercept[0]",
            "services.a.credentials.token",
            "services.b.connector",
            "services.b",
            "extra",
        ],
    );
    assert_no_secret(&out, &["hunter2-literal-secret"], "check output");
}

fn example(name: &str) -> PathBuf {
    workspace_root().join("config").join(name)
}

#[test]
fn seed_and_secretless_files_load_and_name_what_is_not_built() {
    let env = [
        ("ACI_TOKEN_URL", "https://aci.example/token"),
        ("ACI_CLIENT_ID", "agent"),
        ("ACI_CLIENT_SECRET", "client-secret-value-xyz"),
        ("UTS_AUTH_TOKEN", "uts-token-value-xyz"),
    ];
    // Seed 003: services map, credentials list, connectors tcp and http.
    let out = broker_check(&example("seed-003-uts.yaml"), &env);
    let text = output_text(&out);
    assert!(!text.contains("unknown key"), "{text}");
    // The HTTP service gives no header: check asks for one, naming the credential.
    assert!(
        text.contains("services.novu-api.config") && text.contains("api_key"),
        "{text}"
    );
    // Seed 000: services list, generic_http + oauth2 with ${ENV} values.
    let out = broker_check(&example("seed-000-oauth2.yaml"), &env);
    let text = output_text(&out);
    assert!(!text.contains("unknown key"), "{text}");
    // Built now: it needs a way in (`intercept` or `listenOn`), nothing is "not built".
    assert!(
        text.contains("intercept") && !text.contains("not built yet"),
        "{text}"
    );
    assert_no_secret(
        &text,
        &["client-secret-value-xyz", "uts-token-value-xyz"],
        "check output",
    );
    // Without the environment, the unset variables are named with their key paths.
    let out = broker_check(&example("seed-000-oauth2.yaml"), &[]);
    let text = output_text(&out);
    assert!(
        text.contains("ACI_TOKEN_URL") && text.contains("token_url"),
        "{text}"
    );
    // A Secretless v2 file loads as it is: its unix listener is served, its `vault`
    // credential uses the built-in vault instance.
    let out = broker_check(&example("secretless-v2.yaml"), &[("DB_PASSWORD", "x")]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("unknown key")
            && !text.contains("not supported yet")
            && !text.contains("provider \"vault\""),
        "{text}"
    );
    // Our own example passes.
    let out = broker_check(&example("example.yaml"), &env);
    assert!(out.status.success(), "{}", output_text(&out));
}

/// The OAuth2 entry is checked as the token source will use it: a `token_url` that is not
/// an absolute http(s) URL and an unknown `client_auth` are named with their key paths;
/// the client secret is never printed.
#[test]
fn oauth2_token_url_and_client_auth_are_checked() {
    let secret = "oauth2-client-secret-check-7c1d";
    let out = assert_reports(
        &format!(
            "version: 2\nservices:\n  agents:\n    connector: generic_http\n    intercept: [\"api.example.test:443\"]\n    authentication:\n      - type: oauth2\n        config:\n          token_url: ftp://auth.example.test/token\n          client_id: agents\n          client_secret: {secret}\n          client_auth: jwt\n          params: {{resource: \"https://api.example.test\"}}\n          default_lifetime: 10m\n"
        ),
        &[
            "services.agents.authentication[0].config.token_url",
            "not an http:// or https:// URL",
            "services.agents.authentication[0].config.client_auth",
            "\"basic\"",
            "\"body\"",
        ],
    );
    assert_no_secret(&out, &[secret], "check output");
    let (code, out) = check(&format!(
        "version: 2\nservices:\n  agents:\n    connector: generic_http\n    intercept: [\"api.example.test:443\"]\n    authentication:\n      - type: oauth2\n        config:\n          token_url: https://auth.example.test/token\n          client_id: agents\n          client_secret: {secret}\n          client_auth: body\n          audience: https://api.example.test\n          timeout: 5s\n"
    ));
    assert_eq!(code, 0, "{out}");
    assert_no_secret(&out, &[secret], "check output");
}
