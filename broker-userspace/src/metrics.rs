//! Prometheus metrics (`GET /metrics` on the health listener, OpenMetrics text format,
//! `prometheus-client`).
//!
//! One [`Metrics`] per daemon (never a global: tests run several daemons in one
//! process), handed to the places that count:
//!
//! * the connection path ([`crate::proxy`]): per service, a [`ServiceMetrics`] resolved
//!   once per runtime snapshot (kept in `ServiceRt::metrics`) and written when the
//!   connection's result record drops (`proxy::result`): `connections_total`,
//!   `active_connections`, `handshake_duration_seconds`, `bytes_total`,
//!   `spliced_sessions_total`, `splice_fallbacks_total`;
//! * the secret store ([`crate::secrets::SecretStore`]), where each lookup's audit event
//!   is written: `credential_fetches_total`, `credential_fetch_duration_seconds`;
//! * the HTTP connectors' OAuth2 token sources: `token_refreshes_total`;
//! * the policy work (later): [`Metrics::policy_denied`];
//! * the kernel, read at scrape time ([`KernelCollector`]): `ebpf_map_entries`,
//!   `ebpf_map_capacity`, `kernel_redirects_total` (a per-CPU map the connect programs
//!   count in, summed over the CPUs).
//!
//! Cost on the data path: atomics only. Every series handle a connection touches is
//! created once (the first connection of a service, the first lookup of a provider)
//! and kept beside the service or provider; prometheus-client's `Family` (a lock) is
//! only consulted then. Its `Histogram` takes a mutex per observation, so durations use
//! [`AtomicHistogram`] (fixed buckets, atomic counts).
//!
//! Labels are configured names (services, connectors, providers, policy rules) and
//! fixed words (results, cache outcomes, directions): bounded, and never a client
//! address, a port, a path, a secret id or anything read from the network.

use std::{
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet, text::encode,
    },
    metrics::{
        MetricType, TypedMetric,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::{Registry, Unit},
};

use crate::{ebpf::Interceptor, runtime::Current};

/// What `/metrics` answers a client that accepts OpenMetrics with (Prometheus does).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// What `/metrics` answers other clients with: the Prometheus text format 0.0.4.
pub const TEXT_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Whether a request's `Accept` header value asks for OpenMetrics (Prometheus sends
/// `application/openmetrics-text;version=1.0.0;q=0.5,...,text/plain;version=0.0.4;q=0.4`):
/// named, and not refused with `q=0`.
#[must_use]
pub fn accepts_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        parts
            .next()
            .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"))
            && !parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f64>().ok())
                    .is_some_and(|q| q <= 0.0)
            })
    })
}

/// Buckets of `handshake_duration_seconds` (accept to authenticated session).
pub const HANDSHAKE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of `credential_fetch_duration_seconds` (a store call).
pub const FETCH_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0,
];

/// Entries counted per map and scrape, at most, for the hash maps (counted in batches):
/// as much as the largest map holds, so a full map reads as full, and a bound whatever
/// the kernel does meanwhile.
pub const MAP_WALK_CAP: usize = 131_072;
/// Entries counted per map and scrape, at most, for the maps counted key by key (the
/// sockhashes, the LPM trie, the per-CPU counters: one system call per key, about
/// 2.5 us): a map beyond it reads as this many.
pub const MAP_KEY_WALK_CAP: usize = 16_384;
/// How long a map count is reused: scrapes more often than this cost nothing more.
pub const MAP_WALK_EVERY: Duration = Duration::from_secs(5);

/// The result words of `connections_total` (the access log's `result`): `ok`,
/// `aborted`, and [`crate::connector::ConnError::kind`]'s words. Anything else is
/// counted as `other` (none today).
pub const RESULTS: [&str; 12] = [
    "ok",
    "aborted",
    "credentials_error",
    "upstream_unreachable",
    "upstream_tls_error",
    "auth_rejected",
    "upstream_refused",
    "client_closed",
    "protocol_error",
    "config_error",
    "io_error",
    "other",
];

/// The `result` words of `credential_fetches_total`: `ok` and
/// [`crate::secrets::SecretError::kind`]'s words (`other` for anything new).
pub const FETCH_RESULTS: [&str; 11] = [
    "ok",
    "not_configured",
    "not_found",
    "unreachable",
    "denied",
    "bad_reply",
    "bad_id",
    "empty",
    "timeout",
    "circuit_open",
    "other",
];

/// The `cache` words of `credential_fetches_total` (the audit event's `cache`).
pub const CACHE_WORDS: [&str; 5] = ["hit", "miss", "joined", "stale", "none"];

/// Why connections were refused before a service took them.
pub const REFUSALS: [&str; 3] = ["no_record", "stale_record", "cap"];

fn index_of(words: &[&str], w: &str) -> usize {
    words
        .iter()
        .position(|x| *x == w)
        .unwrap_or(words.len() - 1)
}

// ---- label sets -----------------------------------------------------------------------

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    service: String,
    connector: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceConnectorLabels {
    service: String,
    connector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    service: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    provider: String,
    result: String,
    cache: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabel {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    service: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    service: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    service: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabel {
    reason: String,
}

// ---- a histogram without a lock -------------------------------------------------------

/// A histogram of durations with fixed buckets whose observations are atomic adds (no
/// lock): per-bucket counts, the count and the sum in nanoseconds.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [f64],
    /// One per bound, and the last for `+Inf`; not cumulative.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    #[must_use]
    pub fn new(bounds: &'static [f64]) -> Self {
        Self(Arc::new(HistogramInner {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }))
    }

    /// Count one duration.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.0.bounds.partition_point(|b| *b < s);
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.0.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let i = &self.0;
        let buckets: Vec<(f64, u64)> = i
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(i.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' total, so the exposition is consistent even while
        // observations land during the scrape.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = i.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn handshake_histogram() -> AtomicHistogram {
    AtomicHistogram::new(HANDSHAKE_BUCKETS)
}

fn fetch_histogram() -> AtomicHistogram {
    AtomicHistogram::new(FETCH_BUCKETS)
}

type HistogramFamily<L> = Family<L, AtomicHistogram, fn() -> AtomicHistogram>;

// ---- the registry ---------------------------------------------------------------------

/// Every family, cloned out of the registry (each is a handle on shared state).
#[derive(Clone)]
struct Families {
    connections: Family<ConnLabels, Counter>,
    refused: Family<RefusalLabel, Counter>,
    active: Family<ServiceLabel, Gauge>,
    handshake: HistogramFamily<ServiceConnectorLabels>,
    bytes: Family<BytesLabels, Counter>,
    fetches: Family<FetchLabels, Counter>,
    fetch_duration: HistogramFamily<ProviderLabel>,
    token_refreshes: Family<ResultLabels, Counter>,
    policy_denials: Family<RuleLabels, Counter>,
    spliced: Family<ServiceLabel, Counter>,
    fallbacks: Family<ReasonLabels, Counter>,
}

/// The daemon's metrics: the registry `/metrics` encodes, and the families the
/// counting places take their handles from.
pub struct Metrics {
    registry: Registry,
    f: Families,
    /// Refusals by reason ([`REFUSALS`]), created up front.
    refusals: [Counter; 3],
    kernel: Arc<KernelCollector>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family (no series yet), and the kernel collector (which
    /// reports nothing until [`Metrics::watch_kernel`]).
    #[must_use]
    pub fn new() -> Self {
        let f = Families {
            connections: Family::default(),
            refused: Family::default(),
            active: Family::default(),
            handshake: Family::new_with_constructor(handshake_histogram),
            bytes: Family::default(),
            fetches: Family::default(),
            fetch_duration: Family::new_with_constructor(fetch_histogram),
            token_refreshes: Family::default(),
            policy_denials: Family::default(),
            spliced: Family::default(),
            fallbacks: Family::default(),
        };
        let mut r = Registry::with_prefix("broker");
        r.register(
            "connections",
            "Brokered connections by service, connector and result (the access log's result word), counted when each ends",
            f.connections.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused before a service took them: no_record (a direct connection to the transparent listener), stale_record (a redirect record of another configuration), cap (a connection cap)",
            f.refused.clone(),
        );
        r.register(
            "active_connections",
            "Brokered connections open now, by service",
            f.active.clone(),
        );
        r.register_with_unit(
            "handshake_duration",
            "Time from the connector taking an accepted connection to the authenticated session (sessions that reached the byte phase)",
            Unit::Seconds,
            f.handshake.clone(),
        );
        r.register(
            "bytes",
            "Bytes moved by brokered sessions (kernel splice and userspace relay together), direction up = client to server, down = server to client; counted when each connection ends",
            f.bytes.clone(),
        );
        r.register(
            "credential_fetches",
            "Credential lookups (one per service, provider and connection) by provider, result and how the cache answered (hit, miss, joined, stale, none)",
            f.fetches.clone(),
        );
        r.register_with_unit(
            "credential_fetch_duration",
            "Time credential lookups not answered from the cache took (a store call, or waiting for one)",
            Unit::Seconds,
            f.fetch_duration.clone(),
        );
        r.register(
            "token_refreshes",
            "OAuth2 token requests to token endpoints by service and result (ok or the error kind)",
            f.token_refreshes.clone(),
        );
        r.register(
            "policy_denials",
            "Connections a policy rule denied, by service and rule",
            f.policy_denials.clone(),
        );
        r.register(
            "spliced_sessions",
            "Sessions handed to the kernel splice after authentication, by service",
            f.spliced.clone(),
        );
        r.register(
            "splice_fallbacks",
            "Spliced sessions a direction of which went back to the userspace relay, by service and reason (download: the app fell behind; upload: the upstream's send buffer filled, or a command the broker must see)",
            f.fallbacks.clone(),
        );
        let refusals = REFUSALS.map(|reason| {
            f.refused.get_or_create_owned(&RefusalLabel {
                reason: reason.to_owned(),
            })
        });
        let kernel = Arc::new(KernelCollector::default());
        r.register_collector(Box::new(Arc::clone(&kernel)));
        Self {
            registry: r,
            f,
            refusals,
            kernel,
        }
    }

    /// The OpenMetrics text exposition of everything, `# EOF` included.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            // Writing to a String cannot fail; an encoder refusing a value would.
            tracing::warn!("metrics encoding failed");
        }
        out
    }

    /// The same in the Prometheus text format (0.0.4), for clients that do not ask for
    /// OpenMetrics.
    #[must_use]
    pub fn encode_text(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry).is_err() {
            tracing::warn!("metrics encoding failed");
        }
        out
    }

    /// Read the kernel's counters and map sizes at scrape time from `interceptor`,
    /// naming services after `runtime`'s snapshot in force.
    pub fn watch_kernel(&self, interceptor: Weak<Interceptor>, runtime: Weak<Current>) {
        let _ = self.kernel.source.set(KernelSource {
            interceptor,
            runtime,
        });
    }

    /// The handles of one service (create them once per service and snapshot).
    #[must_use]
    pub fn service(&self, service: &str, connector: &str) -> ServiceMetrics {
        let f = &self.f;
        let svc = || ServiceLabel {
            service: service.to_owned(),
        };
        let bytes = |direction: &str| {
            f.bytes.get_or_create_owned(&BytesLabels {
                service: service.to_owned(),
                direction: direction.to_owned(),
            })
        };
        ServiceMetrics {
            service: service.to_owned(),
            connector: connector.to_owned(),
            families: f.clone(),
            results: std::array::from_fn(|_| OnceLock::new()),
            active: f.active.get_or_create_owned(&svc()),
            handshake: f.handshake.get_or_create_owned(&ServiceConnectorLabels {
                service: service.to_owned(),
                connector: connector.to_owned(),
            }),
            up: bytes("up"),
            down: bytes("down"),
            spliced: f.spliced.get_or_create_owned(&svc()),
            fallbacks: [OnceLock::new(), OnceLock::new()],
        }
    }

    /// The handles of one provider instance (create them once per store).
    #[must_use]
    pub fn provider(&self, provider: &str) -> ProviderMetrics {
        ProviderMetrics {
            provider: provider.to_owned(),
            fetches: self.f.fetches.clone(),
            counts: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            durations: self.f.fetch_duration.clone(),
            duration: OnceLock::new(),
        }
    }

    /// A connection refused before any service took it (`reason`: one of
    /// [`REFUSALS`]).
    pub fn refused(&self, reason: &str) {
        self.refusals[index_of(&REFUSALS, reason).min(REFUSALS.len() - 1)].inc();
    }

    /// The counter of `service`'s OAuth2 token requests ending with `result` (`ok` or a
    /// token error's kind: a fixed word).
    #[must_use]
    pub fn token_refresh(&self, service: &str, result: &str) -> Counter {
        self.f.token_refreshes.get_or_create_owned(&ResultLabels {
            service: service.to_owned(),
            result: result.to_owned(),
        })
    }

    /// A policy rule denied a connection of `service` (`rule`: the rule's configured
    /// name). For the policy work; the family is exposed (empty) until then.
    pub fn policy_denied(&self, service: &str, rule: &str) {
        self.f
            .policy_denials
            .get_or_create(&RuleLabels {
                service: service.to_owned(),
                rule: rule.to_owned(),
            })
            .inc();
    }
}

/// One service's series. Everything a connection updates is an atomic.
#[derive(Debug)]
pub struct ServiceMetrics {
    service: String,
    connector: String,
    families: Families,
    /// `connections_total` by [`RESULTS`] index, created at first use.
    results: [OnceLock<Counter>; RESULTS.len()],
    active: Gauge,
    handshake: AtomicHistogram,
    up: Counter,
    down: Counter,
    spliced: Counter,
    /// `splice_fallbacks_total`: download, upload.
    fallbacks: [OnceLock<Counter>; 2],
}

impl std::fmt::Debug for Families {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Families")
    }
}

/// What a finished connection reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct Finished<'a> {
    /// The access log's result word.
    pub result: &'a str,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub spliced: bool,
    /// `ConnStats::splice_fallback`: "", "down", "up" or "both".
    pub fallback: &'a str,
}

impl ServiceMetrics {
    /// A connection of this service is open (until [`ServiceMetrics::closed`]).
    pub fn opened(&self) {
        self.active.inc();
    }

    /// Its session was established this long after the connector took it.
    pub fn handshake(&self, took: Duration) {
        self.handshake.observe(took);
    }

    /// The connection ended (one call per [`ServiceMetrics::opened`]).
    pub fn closed(&self, f: &Finished<'_>) {
        self.active.dec();
        let i = index_of(&RESULTS, f.result);
        self.results[i]
            .get_or_init(|| {
                self.families.connections.get_or_create_owned(&ConnLabels {
                    service: self.service.clone(),
                    connector: self.connector.clone(),
                    result: RESULTS[i].to_owned(),
                })
            })
            .inc();
        if f.bytes_up > 0 {
            self.up.inc_by(f.bytes_up);
        }
        if f.bytes_down > 0 {
            self.down.inc_by(f.bytes_down);
        }
        if f.spliced {
            self.spliced.inc();
        }
        let (down, up) = match f.fallback {
            "down" => (true, false),
            "up" => (false, true),
            "both" => (true, true),
            _ => (false, false),
        };
        for (k, (hit, reason)) in [(down, "download"), (up, "upload")].into_iter().enumerate() {
            if hit {
                self.fallbacks[k]
                    .get_or_init(|| {
                        self.families.fallbacks.get_or_create_owned(&ReasonLabels {
                            service: self.service.clone(),
                            reason: reason.to_owned(),
                        })
                    })
                    .inc();
            }
        }
    }

    /// The series of `connections_total{result}` so far (tests).
    #[must_use]
    pub fn connections(&self, result: &str) -> u64 {
        self.results[index_of(&RESULTS, result)]
            .get()
            .map_or(0, Counter::get)
    }
}

/// One provider instance's series.
pub struct ProviderMetrics {
    provider: String,
    fetches: Family<FetchLabels, Counter>,
    /// By [`FETCH_RESULTS`] then [`CACHE_WORDS`] index, created at first use.
    counts: [[OnceLock<Counter>; CACHE_WORDS.len()]; FETCH_RESULTS.len()],
    durations: HistogramFamily<ProviderLabel>,
    /// Created at the first lookup the cache did not answer.
    duration: OnceLock<AtomicHistogram>,
}

impl std::fmt::Debug for ProviderMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderMetrics")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl ProviderMetrics {
    /// One lookup: its result word (`ok` or the error's kind), how the cache answered
    /// (`hit`, `miss`, `joined`, `stale`, `none`) and how long it took (observed for
    /// lookups the cache did not answer).
    pub fn lookup(&self, result: &str, cache: &str, took: Duration) {
        let r = index_of(&FETCH_RESULTS, result);
        let c = index_of(&CACHE_WORDS, cache);
        self.counts[r][c]
            .get_or_init(|| {
                self.fetches.get_or_create_owned(&FetchLabels {
                    provider: self.provider.clone(),
                    result: FETCH_RESULTS[r].to_owned(),
                    cache: CACHE_WORDS[c].to_owned(),
                })
            })
            .inc();
        if cache != "hit" {
            self.duration
                .get_or_init(|| {
                    self.durations.get_or_create_owned(&ProviderLabel {
                        provider: self.provider.clone(),
                    })
                })
                .observe(took);
        }
    }
}

// ---- the kernel, at scrape time -------------------------------------------------------

/// Where the kernel's numbers come from (set once the programs are attached).
struct KernelSource {
    interceptor: Weak<Interceptor>,
    runtime: Weak<Current>,
}

/// Reads the kernel's redirect counters and map sizes when `/metrics` is scraped.
#[derive(Default)]
pub struct KernelCollector {
    source: OnceLock<KernelSource>,
    /// The last map count and when it was taken (see [`MAP_WALK_EVERY`]); the lock
    /// also makes concurrent scrapes share one walk.
    maps: Mutex<Option<(Instant, Vec<crate::ebpf::MapOccupancy>)>>,
}

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

impl KernelCollector {
    fn occupancy(&self, i: &Interceptor) -> Vec<crate::ebpf::MapOccupancy> {
        let mut cached = self
            .maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, v)) = &*cached
            && at.elapsed() < MAP_WALK_EVERY
        {
            return v.clone();
        }
        let v = i.map_occupancy(MAP_WALK_CAP, MAP_KEY_WALK_CAP);
        *cached = Some((Instant::now(), v.clone()));
        v
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(src) = self.source.get() else {
            return Ok(());
        };
        let Some(i) = src.interceptor.upgrade() else {
            return Ok(());
        };
        let maps = self.occupancy(&i);
        {
            let mut m = encoder.encode_descriptor(
                "ebpf_map_entries",
                "Entries in each of the kernel programs' maps (targets, per-connection records, splice maps, redirect counters), counted at scrape time (at most every 5 s).",
                None,
                MetricType::Gauge,
            )?;
            for o in &maps {
                let labels = [("map", o.name)];
                ConstGauge::new(i64::try_from(o.entries).unwrap_or(i64::MAX))
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "ebpf_map_capacity",
                "Capacity (max_entries) of each of the kernel programs' maps.",
                None,
                MetricType::Gauge,
            )?;
            for o in &maps {
                let labels = [("map", o.name)];
                ConstGauge::new(i64::from(o.capacity)).encode(m.encode_family(&labels)?)?;
            }
        }
        let counts = i.kernel_redirects();
        let rt = src.runtime.upgrade().map(|c| c.load());
        let mut m = encoder.encode_descriptor(
            "kernel_redirects",
            "Connects the kernel redirected to the broker, by service (a per-CPU counter in the connect programs, summed at scrape time).",
            None,
            MetricType::Counter,
        )?;
        if let Some(rt) = rt {
            let mut named: Vec<(&str, u64)> = counts
                .iter()
                .filter_map(|(id, n)| rt.service(*id).map(|s| (s.service.name.as_str(), *n)))
                .collect();
            named.sort_unstable();
            for (service, n) in named {
                let labels = [("service", service)];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn a_finished_connection_counts_everywhere_with_bounded_labels() {
        let m = Metrics::new();
        let s = m.service("db", "pg");
        s.opened();
        s.opened();
        s.handshake(Duration::from_millis(3));
        s.closed(&Finished {
            result: "ok",
            bytes_up: 10,
            bytes_down: 20,
            spliced: true,
            fallback: "both",
        });
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                "broker_connections_total{service=\"db\",connector=\"pg\",result=\"ok\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "broker_active_connections{service=\"db\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "broker_bytes_total{service=\"db\",direction=\"up\"}"),
            Some(10.0)
        );
        assert_eq!(
            sample(
                &text,
                "broker_bytes_total{service=\"db\",direction=\"down\"}"
            ),
            Some(20.0)
        );
        assert_eq!(
            sample(&text, "broker_spliced_sessions_total{service=\"db\"}"),
            Some(1.0)
        );
        for reason in ["download", "upload"] {
            assert_eq!(
                sample(
                    &text,
                    &format!("broker_splice_fallbacks_total{{service=\"db\",reason=\"{reason}\"}}")
                ),
                Some(1.0)
            );
        }
        assert_eq!(
            sample(
                &text,
                "broker_handshake_duration_seconds_bucket{le=\"0.005\",service=\"db\",connector=\"pg\"}"
            )
            .or_else(|| sample(
                &text,
                "broker_handshake_duration_seconds_bucket{service=\"db\",connector=\"pg\",le=\"0.005\"}"
            )),
            Some(1.0),
            "{text}"
        );
        assert!(text.contains("# TYPE broker_handshake_duration_seconds histogram"));
        assert!(text.ends_with("# EOF\n"));
        // An unknown result word is `other`, not a new series.
        s.closed(&Finished {
            result: "surprise",
            ..Finished::default()
        });
        assert_eq!(s.connections("other"), 1);
        assert!(!m.encode().contains("surprise"));
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        assert!(accepts_openmetrics(
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
        ));
        assert!(accepts_openmetrics("Application/OpenMetrics-Text"));
        assert!(!accepts_openmetrics("text/plain;version=0.0.4"));
        assert!(!accepts_openmetrics("*/*"));
        assert!(!accepts_openmetrics("application/openmetrics-text;q=0"));
        let m = Metrics::new();
        m.service("db", "pg").opened();
        let text = m.encode_text();
        assert!(
            text.contains("# TYPE broker_active_connections gauge"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE broker_connections_refused_total counter"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn lookups_count_by_result_and_cache_and_time_only_store_calls() {
        let m = Metrics::new();
        let p = m.provider("vault");
        p.lookup("ok", "miss", Duration::from_millis(2));
        p.lookup("ok", "hit", Duration::from_micros(3));
        p.lookup("ok", "hit", Duration::from_micros(3));
        p.lookup("unreachable", "none", Duration::from_millis(30));
        let text = m.encode();
        let line = |r: &str, c: &str| {
            format!(
                "broker_credential_fetches_total{{provider=\"vault\",result=\"{r}\",cache=\"{c}\"}}"
            )
        };
        assert_eq!(sample(&text, &line("ok", "hit")), Some(2.0), "{text}");
        assert_eq!(sample(&text, &line("ok", "miss")), Some(1.0));
        assert_eq!(sample(&text, &line("unreachable", "none")), Some(1.0));
        assert_eq!(
            sample(
                &text,
                "broker_credential_fetch_duration_seconds_count{provider=\"vault\"}"
            ),
            Some(2.0)
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_sum_in_seconds() {
        let h = AtomicHistogram::new(&[0.01, 0.1]);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(10));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(1));
        let mut r = Registry::default();
        r.register_with_unit("x", "x", Unit::Seconds, h.clone());
        let mut out = String::new();
        encode(&mut out, &r).unwrap();
        assert_eq!(
            sample(&out, "x_seconds_bucket{le=\"0.01\"}"),
            Some(2.0),
            "{out}"
        );
        assert_eq!(sample(&out, "x_seconds_bucket{le=\"0.1\"}"), Some(3.0));
        assert_eq!(sample(&out, "x_seconds_bucket{le=\"+Inf\"}"), Some(4.0));
        assert_eq!(sample(&out, "x_seconds_count"), Some(4.0));
        assert!((sample(&out, "x_seconds_sum").unwrap() - 1.065).abs() < 1e-9);
    }

    #[test]
    fn refusals_policy_and_tokens_are_exposed() {
        let m = Metrics::new();
        m.refused("no_record");
        m.policy_denied("db", "deny-nobody");
        m.token_refresh("api", "ok").inc();
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                "broker_connections_refused_total{reason=\"no_record\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "broker_connections_refused_total{reason=\"cap\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                "broker_policy_denials_total{service=\"db\",rule=\"deny-nobody\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "broker_token_refreshes_total{service=\"api\",result=\"ok\"}"
            ),
            Some(1.0)
        );
    }
}
