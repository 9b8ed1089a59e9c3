//! The failure keys every provider block accepts (`cacheTTL`, `staleFor`, `breaker`)
//! and a service's `cache:` block: defaults, overrides, and errors at their key paths.

use std::time::Duration;

use super::*;
use crate::connector::KINDS;

fn load(text: &str) -> Result<Config, ConfigErrors> {
    load_str_with_env(text, &|_| None, &KINDS)
}

#[track_caller]
fn ok(text: &str) -> Config {
    load(text).unwrap_or_else(|e| panic!("expected the config to load, got:\n{e}"))
}

#[track_caller]
fn has(e: &ConfigErrors, path: &str, needle: &str) {
    assert!(
        e.0.iter()
            .any(|x| x.path == path && x.message.contains(needle)),
        "no error at {path:?} containing {needle:?}; got:\n{e}"
    );
}

const SERVICE: &str = "
services:
  db:
    connector: tcp
    listenOn: tcp://127.0.0.1:5432
    credentials:
      host: h
      password: {from: uts, get: db/pw}
";

fn with_providers(providers: &str) -> String {
    format!("version: 2\nproviders:\n{providers}{SERVICE}")
}

#[test]
fn provider_failure_keys_and_their_defaults() {
    let cfg = ok(&with_providers(
        "  uts:
    type: http
    baseUrl: http://127.0.0.1:1/
    cacheTTL: 30s
    staleFor: 10m
    breaker: {failures: 3, backoff: 500ms, maxBackoff: 20s}
  quiet: {type: http, breaker: off}
  plain: {type: http}
  files: {type: file, breaker: on, staleFor: 1m}
  envs: {type: env}
",
    ));
    let p = &cfg.fetch_policies;
    assert_eq!(
        p["uts"],
        FetchPolicy {
            cache_ttl: Some(Duration::from_secs(30)),
            stale_for: Duration::from_secs(600),
            breaker: Some(BreakerConfig {
                failures: 3,
                backoff: Duration::from_millis(500),
                max_backoff: Duration::from_secs(20),
            }),
        }
    );
    assert_eq!(p["quiet"].breaker, None);
    // Network stores: the breaker is on by default (5 failures, 1 s, 60 s); no stale
    // window (fail closed); the broker's TTL.
    assert_eq!(p["plain"], FetchPolicy::default_for("http"));
    assert_eq!(
        p["plain"].breaker,
        Some(BreakerConfig {
            failures: 5,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        })
    );
    assert_eq!(p["plain"].stale_for, Duration::ZERO);
    assert_eq!(p["plain"].cache_ttl, None);
    // Local kinds: off unless asked for.
    assert_eq!(p["envs"].breaker, None);
    assert_eq!(p["files"].breaker, Some(BreakerConfig::default()));
    assert_eq!(p["files"].stale_for, Duration::from_secs(60));
    // The built-in instances have no entry: their kind's defaults apply.
    assert!(!p.contains_key("http") && !p.contains_key("env"));

    // A map sets what it names; `backoff` alone above the default cap raises the cap.
    let cfg = ok(&with_providers(
        "  uts: {type: http}\n  a: {type: http, breaker: {failures: 2}}\n  b: {type: http, breaker: {backoff: 2m}}\n  c: {type: http, breaker: true}\n",
    ));
    let b = cfg.fetch_policies["a"].breaker.unwrap();
    assert_eq!((b.failures, b.backoff), (2, Duration::from_secs(1)));
    let b = cfg.fetch_policies["b"].breaker.unwrap();
    assert_eq!(
        (b.backoff, b.max_backoff),
        (Duration::from_secs(120), Duration::from_secs(120))
    );
    assert_eq!(
        cfg.fetch_policies["c"].breaker,
        Some(BreakerConfig::default())
    );
}

#[test]
fn service_cache_block() {
    let cfg = ok("
version: 2
services:
  db:
    connector: tcp
    listenOn: tcp://127.0.0.1:5432
    credentials: {host: h}
    cache: {ttl: 30s, staleFor: 10m}
  other:
    connector: tcp
    listenOn: tcp://127.0.0.1:5433
    credentials: {host: h}
    cache: {staleFor: 0s}
");
    assert_eq!(
        cfg.services[0].cache,
        CacheOverride {
            ttl: Some(Duration::from_secs(30)),
            stale_for: Some(Duration::from_secs(600)),
        }
    );
    assert_eq!(
        cfg.services[1].cache,
        CacheOverride {
            ttl: None,
            stale_for: Some(Duration::ZERO),
        }
    );
    // The list shape too.
    let cfg = ok("
version: 2
services:
  - name: db
    connector: tcp
    listenOn: tcp://127.0.0.1:5432
    credentials: {host: h}
    cache: {ttl: 5s}
");
    assert_eq!(cfg.services[0].cache.ttl, Some(Duration::from_secs(5)));
}

#[test]
fn failure_key_errors_name_the_key_path() {
    let e = load(&with_providers(
        "  uts:
    type: http
    cacheTTL: forever
    staleFor: 10
    breaker: sometimes
  b1: {type: http, breaker: {failures: 0, backoff: 0s, maxBackof: 1s}}
  b2: {type: http, breaker: {backoff: 10s, maxBackoff: 5s}}
  b3: {type: http, breaker: [1]}
  f: {type: file, staleFr: 1m}
",
    ))
    .unwrap_err();
    has(&e, "providers.uts.cacheTTL", "invalid duration \"forever\"");
    has(&e, "providers.uts.staleFor", "invalid duration");
    has(
        &e,
        "providers.uts.breaker",
        "invalid breaker \"sometimes\": expected off, on",
    );
    has(&e, "providers.b1.breaker.failures", "must be at least 1");
    has(&e, "providers.b1.breaker.backoff", "must be more than 0");
    has(
        &e,
        "providers.b1.breaker.maxBackof",
        "unknown key \"maxBackof\" (did you mean \"maxBackoff\"?)",
    );
    has(
        &e,
        "providers.b2.breaker.maxBackoff",
        "must not be less than backoff (10s)",
    );
    has(&e, "providers.b3.breaker", "must be off, on, or a map");
    has(
        &e,
        "providers.f.staleFr",
        "unknown key \"staleFr\" (did you mean \"staleFor\"?)",
    );

    let e = load(
        "
version: 2
services:
  db:
    connector: tcp
    listenOn: tcp://127.0.0.1:5432
    credentials: {host: h}
    cache: {ttl: soon, stale: 1m}
  other:
    connector: tcp
    listenOn: tcp://127.0.0.1:5433
    credentials: {host: h}
    cache: 30s
",
    )
    .unwrap_err();
    has(&e, "services.db.cache.ttl", "invalid duration \"soon\"");
    has(&e, "services.db.cache.stale", "unknown key \"stale\"");
    has(&e, "services.other.cache", "must be a map {ttl, staleFor}");
}

/// A provider kind's own parser checks its keys with `provider_keys`, so the common
/// keys are accepted by every kind, and suggested for typos.
#[test]
fn every_built_kind_accepts_the_common_keys() {
    for kind in BUILT_PROVIDERS {
        let cfg = ok(&with_providers(&format!(
            "  uts: {{type: {kind}, cacheTTL: 1s, staleFor: 2s, breaker: off}}\n"
        )));
        assert_eq!(
            cfg.fetch_policies["uts"],
            FetchPolicy {
                cache_ttl: Some(Duration::from_secs(1)),
                stale_for: Duration::from_secs(2),
                breaker: None,
            },
            "{kind}"
        );
    }
    assert_eq!(COMMON_PROVIDER_KEYS, ["cacheTTL", "staleFor", "breaker"]);
}
