//! The store's failure behaviour, with tokio's paused clock and providers that count
//! their calls: grouped fetches (one `get_many` per service and provider), the stale
//! window, the circuit breaker, per-provider and per-service policies, the provider's
//! timeout, and the audit event of each lookup (captured, grepped for values).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use super::*;
use crate::config::{BreakerConfig, CacheOverride, FetchPolicy};

// ---- a store with leases ----------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Up,
    /// Unreachable (HTTP 503): an outage.
    Down,
    /// Garbage: a bad reply, an outage too.
    Garbage,
    NotFound,
    Denied,
}

/// A store where every call is one lease `n`: the value of `id` is `id@n`. With
/// `batch`, `get_many` is one call (one lease for all its ids), otherwise the default
/// (one `get` per id). Counts both, remembers the ids of each `get_many`.
struct Leases {
    name: &'static str,
    batch: bool,
    mode: Mutex<Mode>,
    delay: Mutex<Duration>,
    timeout: Option<Duration>,
    expires_in: Option<Duration>,
    leases: AtomicUsize,
    gets: AtomicUsize,
    many: AtomicUsize,
    asked: Mutex<Vec<Vec<String>>>,
}

impl Leases {
    fn new(name: &'static str, batch: bool) -> Self {
        Self {
            name,
            batch,
            mode: Mutex::new(Mode::Up),
            delay: Mutex::new(Duration::ZERO),
            timeout: None,
            expires_in: None,
            leases: 0.into(),
            gets: 0.into(),
            many: 0.into(),
            asked: Mutex::default(),
        }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }

    /// Store calls so far: `get_many` calls when batching, `get` calls otherwise.
    fn calls(&self) -> usize {
        if self.batch {
            self.many.load(Ordering::SeqCst)
        } else {
            self.gets.load(Ordering::SeqCst)
        }
    }

    async fn answer(&self, ids: &[&str]) -> Result<Vec<Fetched>, SecretError> {
        let n = self.leases.fetch_add(1, Ordering::SeqCst) + 1;
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let (provider, id) = (self.name.to_owned(), ids[0].to_owned());
        match *self.mode.lock().unwrap() {
            Mode::Up => Ok(ids
                .iter()
                .map(|id| Fetched {
                    value: Secret::from_str_value(&format!("{id}@{n}")),
                    expires_in: self.expires_in,
                })
                .collect()),
            Mode::Down => Err(SecretError::Unreachable {
                provider,
                id,
                reason: "HTTP status 503 Service Unavailable".into(),
            }),
            Mode::Garbage => Err(SecretError::BadReply {
                provider,
                id,
                reason: "not JSON".into(),
            }),
            Mode::NotFound => Err(SecretError::NotFound { provider, id }),
            Mode::Denied => Err(SecretError::Denied {
                provider,
                id,
                reason: "HTTP status 403 Forbidden".into(),
            }),
        }
    }
}

impl SecretProvider for Leases {
    fn name(&self) -> &str {
        self.name
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Fetched, SecretError>> {
        Box::pin(async move {
            self.gets.fetch_add(1, Ordering::SeqCst);
            Ok(self.answer(&[id]).await?.remove(0))
        })
    }

    fn get_many<'a>(
        &'a self,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<Fetched>, SecretError>> {
        if !self.batch {
            return Box::pin(futures_util::future::try_join_all(
                ids.iter().map(|id| self.get(id)),
            ));
        }
        Box::pin(async move {
            self.many.fetch_add(1, Ordering::SeqCst);
            self.asked
                .lock()
                .unwrap()
                .push(ids.iter().map(|s| (*s).to_owned()).collect());
            self.answer(ids).await
        })
    }

    fn timeout(&self) -> Option<Duration> {
        self.timeout
    }
}

fn policy(ttl: u64, stale_for: u64, breaker: Option<BreakerConfig>) -> FetchPolicy {
    FetchPolicy {
        cache_ttl: Some(Duration::from_secs(ttl)),
        stale_for: Duration::from_secs(stale_for),
        breaker,
    }
}

fn breaker(failures: u32) -> Option<BreakerConfig> {
    Some(BreakerConfig {
        failures,
        backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(4),
    })
}

fn store(providers: &[(&Arc<Leases>, FetchPolicy)]) -> Arc<SecretStore> {
    let mut ps: HashMap<String, Arc<dyn SecretProvider>> = HashMap::new();
    let mut policies = HashMap::new();
    for (p, pol) in providers {
        ps.insert(p.name.into(), Arc::clone(p) as Arc<dyn SecretProvider>);
        policies.insert(p.name.to_owned(), pol.clone());
    }
    Arc::new(SecretStore::with_policies(
        ps,
        policies,
        Duration::from_secs(60),
    ))
}

/// A `tcp` service with a literal `port` and `creds` (name, provider, id).
fn service(name: &str, creds: &[(&str, &str, &str)], cache: CacheOverride) -> Service {
    let mut credentials = BTreeMap::new();
    credentials.insert(
        "port".to_owned(),
        CredentialSource::Literal(Secret::from_str_value("5432")),
    );
    for (n, provider, id) in creds {
        credentials.insert(
            (*n).to_owned(),
            CredentialSource::Provider {
                provider: (*provider).into(),
                id: (*id).into(),
            },
        );
    }
    Service {
        name: name.into(),
        connector: crate::config::ConnectorSpec::built(
            "tcp",
            crate::connector::tcp::TcpConfig::default(),
        ),
        listen_on: None,
        intercept: vec![],
        credentials,
        authentication: vec![],
        cache,
        unix_socket: crate::config::UnixSocketOptions::default(),
        policy: crate::policy::Spec::default(),
    }
}

/// The service `db`: `username`, `password` and `host` from `lease`.
fn db() -> Service {
    service(
        "db",
        &[
            ("username", "lease", "db/creds#username"),
            ("password", "lease", "db/creds#password"),
            ("host", "lease", "db/host"),
        ],
        CacheOverride::default(),
    )
}

fn caller() -> crate::connector::Caller {
    crate::connector::Caller {
        pid: 4242,
        uid: 1001,
        gid: 1002,
        cgroup_id: 77,
        cgroup: Some("/apps/orders".into()),
        exe: Some("/opt/orders/bin/orders-app".into()),
        comm: "orders-app".into(),
        thread: "worker-3".into(),
    }
}

/// The service's provider credentials as text, name -> value.
async fn values(
    store: &SecretStore,
    s: &Service,
    fresh: bool,
) -> Result<BTreeMap<String, String>, CredentialError> {
    let c = caller();
    let mut fetched = Vec::new();
    let creds = store
        .credentials(Requester::new(s, Some(&c)), fresh, &mut fetched)
        .await?;
    assert_eq!(fetched.len(), s.credentials.len() - 1, "{fetched:?}");
    Ok(creds
        .0
        .iter()
        .filter(|(k, _)| *k != "port")
        .map(|(k, v)| (k.clone(), v.expose_str().unwrap().to_owned()))
        .collect())
}

/// The lease number every value of `v` carries (they must agree).
fn lease(v: &BTreeMap<String, String>) -> usize {
    let leases: Vec<usize> = v
        .values()
        .map(|s| s.rsplit_once('@').unwrap().1.parse().unwrap())
        .collect();
    assert!(
        leases.windows(2).all(|w| w[0] == w[1]),
        "values of one group come from one call: {v:?}"
    );
    leases[0]
}

// ---- log capture --------------------------------------------------------------------

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn count(&self, needle: &str) -> usize {
        self.text().lines().filter(|l| l.contains(needle)).count()
    }
}

/// Capture this thread's events (the tests run on tokio's current-thread runtime).
fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
    // tracing caches each callsite's interest once, process-wide, computed (while at
    // most one dispatcher exists) from the *registering* thread's subscriber: a sibling
    // test reaching `credential fetch` first on a thread with none pinned it to "never"
    // and this capture missed events (about 1 run in 10). A global default on every
    // thread keeps the cached interest "always"; each test's own default still gets
    // its events.
    static GLOBAL: std::sync::Once = std::sync::Once::new();
    GLOBAL.call_once(|| {
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
    let logs = Logs::default();
    let w = logs.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    (logs, tracing::subscriber::set_default(sub))
}

const STALE_START: &str = "serving the last values (stale)";
const STALE_OVER: &str = "the stale window is over";
const RECOVERED: &str = "secret store answering again: fresh values";

// ---- grouped fetches ----------------------------------------------------------------

/// A service's three credentials from one batching provider: 20 concurrent first
/// connections cause ONE `get_many` (no `get`), with the ids sorted; every connection
/// gets values of that one lease. Cached as one group; a `fresh` request refetches the
/// whole group, again in one call.
#[tokio::test(start_paused = true)]
async fn a_service_s_credentials_from_one_provider_are_one_store_call() {
    let p = Arc::new(Leases::new("lease", true));
    p.set_delay(Duration::from_millis(100));
    let s = store(&[(&p, policy(60, 0, breaker(5)))]);
    let svc = Arc::new(db());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (s, svc) = (Arc::clone(&s), Arc::clone(&svc));
        tasks.spawn(async move { values(&s, &svc, false).await.unwrap() });
    }
    for v in tasks.join_all().await {
        assert_eq!(lease(&v), 1);
        assert_eq!(v["password"], "db/creds#password@1");
        assert_eq!(v["host"], "db/host@1");
    }
    assert_eq!(p.many.load(Ordering::SeqCst), 1);
    assert_eq!(p.gets.load(Ordering::SeqCst), 0, "never one get per id");
    assert_eq!(
        p.asked.lock().unwrap()[0],
        ["db/creds#password", "db/creds#username", "db/host"]
    );
    assert_eq!(s.cached(), 1, "one group");

    assert_eq!(lease(&values(&s, &svc, false).await.unwrap()), 1);
    assert_eq!(p.calls(), 1, "served from the cache");
    assert_eq!(lease(&values(&s, &svc, true).await.unwrap()), 2);
    assert_eq!(p.calls(), 2, "fresh: the whole group, in one call");
    assert_eq!(lease(&values(&s, &svc, false).await.unwrap()), 2);
    assert_eq!(p.calls(), 2);
}

/// Without its own `get_many`, a provider is asked once per id, and the values are
/// still cached (and expire) as one group; two services asking the same ids under the
/// same policy share the group; credentials from two providers are two groups.
#[tokio::test(start_paused = true)]
async fn the_default_get_many_asks_per_id_and_groups_are_per_provider() {
    let one = Arc::new(Leases::new("lease", false));
    let other = Arc::new(Leases::new("other", true));
    let s = store(&[(&one, policy(10, 0, None)), (&other, policy(60, 0, None))]);
    let v = values(&s, &db(), false).await.unwrap();
    assert_eq!(one.gets.load(Ordering::SeqCst), 3);
    assert_eq!(s.cached(), 1);
    // A second service with the same ids shares the group.
    let twin = service(
        "twin",
        &[
            ("host", "lease", "db/host"),
            ("user", "lease", "db/creds#username"),
            ("pw", "lease", "db/creds#password"),
        ],
        CacheOverride::default(),
    );
    let t = values(&s, &twin, false).await.unwrap();
    assert_eq!(t["pw"], v["password"]);
    assert_eq!(one.gets.load(Ordering::SeqCst), 3);
    // They expire together.
    tokio::time::sleep(Duration::from_secs(11)).await;
    values(&s, &db(), false).await.unwrap();
    assert_eq!(one.gets.load(Ordering::SeqCst), 6);

    let mixed = service(
        "mixed",
        &[
            ("username", "lease", "db/creds#username"),
            ("password", "other", "pw"),
            ("token", "other", "tok"),
        ],
        CacheOverride::default(),
    );
    let v = values(&s, &mixed, false).await.unwrap();
    assert_eq!(v["password"], "pw@1");
    assert_eq!(v["token"], "tok@1");
    assert_eq!(other.calls(), 1);
    assert_eq!(s.cached(), 3);
}

/// An id a service uses under two names is asked once; both names get its value.
#[tokio::test(start_paused = true)]
async fn one_id_under_two_names_is_asked_once() {
    let p = Arc::new(Leases::new("lease", true));
    let s = store(&[(&p, policy(60, 0, None))]);
    let svc = service(
        "dup",
        &[("user", "lease", "same"), ("login", "lease", "same")],
        CacheOverride::default(),
    );
    let v = values(&s, &svc, false).await.unwrap();
    assert_eq!(v["user"], "same@1");
    assert_eq!(v["login"], "same@1");
    assert_eq!(p.asked.lock().unwrap()[0], ["same"]);
}

// ---- the stale window ---------------------------------------------------------------

/// TTL 10 s, staleFor 30 s: through an outage the last values are served (the store is
/// still asked each time), until 30 s past the TTL; then refused with the store's error.
/// One warning when stale serving starts, one when it ends, one info line on recovery.
#[tokio::test(start_paused = true)]
async fn a_stale_window_serves_the_last_values_through_an_outage_then_refuses() {
    let (logs, _g) = capture();
    let t0 = tokio::time::Instant::now();
    let p = Arc::new(Leases::new("lease", true));
    let s = store(&[(&p, policy(10, 30, None))]);
    assert_eq!(lease(&values(&s, &db(), false).await.unwrap()), 1);
    p.set(Mode::Down);
    for at in [11, 20, 39] {
        tokio::time::sleep_until(t0 + Duration::from_secs(at)).await;
        let v = values(&s, &db(), false).await.unwrap();
        assert_eq!(lease(&v), 1, "stale at {at} s");
    }
    assert_eq!(p.calls(), 4, "the store is asked each time");
    assert_eq!(logs.count(STALE_START), 1, "{}", logs.text());
    tokio::time::sleep_until(t0 + Duration::from_secs(41)).await;
    for _ in 0..3 {
        let e = values(&s, &db(), false).await.unwrap_err();
        assert_eq!(e.kind(), "unreachable", "{e}");
        assert!(e.to_string().contains("lease: fetching"), "{e}");
    }
    assert_eq!(logs.count(STALE_OVER), 1, "{}", logs.text());
    p.set(Mode::Up);
    assert_eq!(lease(&values(&s, &db(), false).await.unwrap()), 8);
    assert_eq!(logs.count(RECOVERED), 1, "{}", logs.text());
    assert_eq!(logs.count(STALE_START), 1);
    assert_eq!(logs.count("cache=\"stale\""), 3, "{}", logs.text());
    assert!(!logs.text().contains("@1"), "no value in any log line");
}

/// Without a stale window (the default) an outage refuses the connection as soon as the
/// TTL is over: fail closed.
#[tokio::test(start_paused = true)]
async fn without_a_stale_window_an_outage_fails_closed() {
    let p = Arc::new(Leases::new("lease", true));
    let s = store(&[(&p, policy(10, 0, None))]);
    values(&s, &db(), false).await.unwrap();
    p.set(Mode::Garbage);
    tokio::time::sleep(Duration::from_secs(11)).await;
    let e = values(&s, &db(), false).await.unwrap_err();
    assert_eq!(e.kind(), "bad_reply");
    assert_eq!(s.cached(), 1, "kept until swept, never served");
}

/// The store's own answers (not found, denied) and a rejected value are never served
/// stale; nor is a value past the provider's expiry (a lease's end).
#[tokio::test(start_paused = true)]
async fn only_outages_get_stale_values_and_never_past_the_provider_expiry() {
    let p = Arc::new(Leases::new("lease", true));
    let s = store(&[(&p, policy(10, 60, None))]);
    values(&s, &db(), false).await.unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;
    for (mode, kind) in [(Mode::NotFound, "not_found"), (Mode::Denied, "denied")] {
        p.set(mode);
        let e = values(&s, &db(), false).await.unwrap_err();
        assert_eq!(e.kind(), kind);
    }
    p.set(Mode::Down);
    assert_eq!(lease(&values(&s, &db(), false).await.unwrap()), 1);
    // The upstream rejects the values: a fresh fetch fails, and they are never used
    // stale again.
    let e = values(&s, &db(), true).await.unwrap_err();
    assert_eq!(e.kind(), "unreachable");
    let e = values(&s, &db(), false).await.unwrap_err();
    assert_eq!(e.kind(), "unreachable");

    let mut leased = Leases::new("lease", true);
    leased.expires_in = Some(Duration::from_secs(15));
    let p = Arc::new(leased);
    let s = store(&[(&p, policy(10, 60, None))]);
    values(&s, &db(), false).await.unwrap();
    p.set(Mode::Down);
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(lease(&values(&s, &db(), false).await.unwrap()), 1);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let e = values(&s, &db(), false).await.unwrap_err();
    assert_eq!(e.kind(), "unreachable", "the lease ended at 15 s");
}

/// A service's `cache:` block overrides its provider's TTL and stale window.
#[tokio::test(start_paused = true)]
async fn a_service_cache_block_overrides_the_provider_policy() {
    let p = Arc::new(Leases::new("lease", true));
    let s = store(&[(&p, policy(60, 0, None))]);
    let short = service(
        "short",
        &[("password", "lease", "pw")],
        CacheOverride {
            ttl: Some(Duration::from_secs(5)),
            stale_for: Some(Duration::from_secs(100)),
        },
    );
    let plain = service(
        "plain",
        &[("password", "lease", "pw")],
        CacheOverride::default(),
    );
    values(&s, &short, false).await.unwrap();
    values(&s, &plain, false).await.unwrap();
    assert_eq!(p.calls(), 2, "two policies, two groups");
    tokio::time::sleep(Duration::from_secs(6)).await;
    values(&s, &plain, false).await.unwrap();
    assert_eq!(p.calls(), 2, "the provider's 60 s");
    values(&s, &short, false).await.unwrap();
    assert_eq!(p.calls(), 3, "the service's 5 s");
    p.set(Mode::Down);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(values(&s, &short, false).await.unwrap()["password"], "pw@3");
    assert!(values(&s, &plain, false).await.is_err(), "no stale window");
}

// ---- the circuit breaker ------------------------------------------------------------

/// After 3 failed calls the store is not called: requests are refused at once with
/// `circuit_open` naming the provider and the id. After the pause one probe goes
/// through; a request for another group meanwhile is refused (one probe at a time); a
/// failed probe doubles the pause; a successful one closes the circuit.
#[tokio::test(start_paused = true)]
async fn the_breaker_opens_after_n_failures_and_lets_one_probe_through() {
    let (logs, _g) = capture();
    let p = Arc::new(Leases::new("lease", true));
    let s = store(&[(&p, policy(0, 0, breaker(3)))]);
    let other = service(
        "other",
        &[("token", "lease", "tok")],
        CacheOverride::default(),
    );
    p.set(Mode::Down);
    for _ in 0..3 {
        assert_eq!(
            values(&s, &db(), false).await.unwrap_err().kind(),
            "unreachable"
        );
    }
    assert_eq!(p.calls(), 3);
    assert!(!s.circuit_closed("lease"));
    let started = tokio::time::Instant::now();
    for svc in [db(), other.clone()] {
        let e = values(&s, &svc, false).await.unwrap_err();
        assert_eq!(e.kind(), "circuit_open");
        let text = e.to_string();
        assert!(
            text.contains("lease: `") && text.contains("circuit open, next attempt in"),
            "{text}"
        );
    }
    assert_eq!(started.elapsed(), Duration::ZERO, "refused at once");
    assert_eq!(p.calls(), 3, "no store call while open");
    assert_eq!(logs.count("circuit open, not calling it"), 1);

    // The probe.
    tokio::time::sleep(Duration::from_secs(1)).await;
    p.set_delay(Duration::from_millis(500));
    let probe = {
        let s = Arc::clone(&s);
        tokio::spawn(async move { values(&s, &db(), false).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = values(&s, &other, false).await.unwrap_err();
    assert!(
        e.to_string().contains("a probe request is in flight"),
        "{e}"
    );
    assert_eq!(probe.await.unwrap().unwrap_err().kind(), "unreachable");
    assert_eq!(p.calls(), 4);
    // Open again, for about 2 s now.
    tokio::time::sleep(Duration::from_millis(1_400)).await;
    assert_eq!(
        values(&s, &other, false).await.unwrap_err().kind(),
        "circuit_open"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    p.set(Mode::Up);
    p.set_delay(Duration::ZERO);
    assert_eq!(values(&s, &other, false).await.unwrap()["token"], "tok@5");
    assert!(s.circuit_closed("lease"));
    assert_eq!(logs.count("circuit closed"), 1, "{}", logs.text());
    assert_eq!(logs.count("circuit open, not calling it"), 1, "logged once");
}

/// While the circuit is open, a group with a stale window gets its last values without
/// any store call.
#[tokio::test(start_paused = true)]
async fn an_open_circuit_serves_stale_values_without_calling_the_store() {
    let p = Arc::new(Leases::new("lease", true));
    let s = store(&[(&p, policy(1, 60, breaker(2)))]);
    values(&s, &db(), false).await.unwrap();
    p.set(Mode::Down);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert_eq!(lease(&values(&s, &db(), false).await.unwrap()), 1);
    }
    assert_eq!(p.calls(), 3);
    for _ in 0..10 {
        assert_eq!(lease(&values(&s, &db(), false).await.unwrap()), 1);
    }
    assert_eq!(p.calls(), 3, "open: no calls, stale values");
}

/// Answers that are not outages never open the circuit: a store that says "not found"
/// a hundred times is up.
#[tokio::test(start_paused = true)]
async fn not_found_and_denied_do_not_open_the_circuit() {
    let p = Arc::new(Leases::new("lease", true));
    let s = store(&[(&p, policy(0, 0, breaker(2)))]);
    for mode in [Mode::NotFound, Mode::Denied] {
        p.set(mode);
        for _ in 0..10 {
            assert!(values(&s, &db(), false).await.is_err());
        }
    }
    assert!(s.circuit_closed("lease"));
    assert_eq!(p.calls(), 20);
}

/// Every store call is bounded by the provider's `timeout` (else [`FETCH_TIMEOUT`]).
#[tokio::test(start_paused = true)]
async fn the_provider_timeout_bounds_every_store_call() {
    let mut slow = Leases::new("lease", true);
    slow.timeout = Some(Duration::from_secs(2));
    let p = Arc::new(slow);
    p.set_delay(Duration::from_secs(3600));
    let s = store(&[(&p, policy(60, 0, breaker(5)))]);
    let started = tokio::time::Instant::now();
    let e = values(&s, &db(), false).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(e.kind(), "timeout");
    assert!(e.to_string().contains("timed out after 2s"), "{e}");
}

// ---- audit ----------------------------------------------------------------------------

/// Each lookup is one `audit` event naming the service, the caller, the provider, the
/// ids and credentials, how the cache answered, the result and the latency; never a
/// value.
#[tokio::test(start_paused = true)]
async fn every_lookup_is_one_audit_event_without_values() {
    let (logs, _g) = capture();
    let p = Arc::new(Leases::new("lease", true));
    let s = store(&[(&p, policy(60, 0, None))]);
    values(&s, &db(), false).await.unwrap();
    values(&s, &db(), false).await.unwrap();
    p.set(Mode::Down);
    values(&s, &db(), true).await.unwrap_err();
    let text = logs.text();
    let audit: Vec<&str> = text.lines().filter(|l| l.contains(" audit:")).collect();
    assert_eq!(audit.len(), 3, "{text}");
    for l in &audit {
        for field in [
            "credential fetch",
            "service=db ",
            "caller.pid=4242",
            "caller.uid=1001",
            "caller.cgroup=77",
            "caller.comm=\"orders-app\"",
            "caller.thread=\"worker-3\"",
            "provider=lease ",
            "ids=db/creds#password,db/creds#username,db/host",
            "credentials=host,password,username",
            "latency_us=",
        ] {
            assert!(l.contains(field), "{field} in {l}");
        }
    }
    assert!(audit[0].contains("cache=\"miss\"") && audit[0].contains("result=\"ok\""));
    assert!(audit[1].contains("cache=\"hit\"") && audit[1].contains("fresh=false"));
    assert!(
        audit[2].contains("fresh=true")
            && audit[2].contains("result=\"unreachable\"")
            && audit[2].contains("error=lease: fetching"),
        "{}",
        audit[2]
    );
    assert!(!text.contains("@1"), "no value in any log line:\n{text}");
}

/// With a stale window the values are kept until the window ends, then swept (and
/// zeroized); the sweeper ends with the store.
#[tokio::test(start_paused = true)]
async fn stale_values_are_swept_when_the_window_ends() {
    let p = Arc::new(Leases::new("lease", true));
    let s = store(&[(&p, policy(10, 20, None))]);
    let sweeper = tokio::spawn(s.sweeper());
    values(&s, &db(), false).await.unwrap();
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(s.cached(), 1, "kept for outages");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(s.cached(), 0, "swept at 30 s");
    drop(s);
    tokio::time::timeout(Duration::from_secs(1), sweeper)
        .await
        .expect("the sweeper ends with the store")
        .unwrap();
}
