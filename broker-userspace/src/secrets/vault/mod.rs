//! `vault`: secrets from HashiCorp Vault (KV v1 and v2, and any engine read with a
//! `GET`, such as dynamic database credentials), as Secretless' `vault` provider reads
//! them, plus the logins and leases Secretless lacks.
//!
//! * Ids: `PATH[#FIELD]` ([`id`]): `kv/db#password`, `kv/db` (field `value`),
//!   `secret/data/db#data.password` (KV v2 as written), `secret/db#password` (KV v2,
//!   found by the mount look-up the Vault CLI does: `GET
//!   sys/internal/ui/mounts/PATH`), `database/creds/app#username`.
//! * Settings: the instance's keys, else `VAULT_ADDR`, `VAULT_TOKEN`,
//!   `VAULT_NAMESPACE`, `VAULT_CACERT` ([`settings`]). The built-in `vault` instance
//!   needs no `providers:` entry.
//! * Auth: a token (fixed, or a file), AppRole or Kubernetes, renewed and replaced by
//!   the [`client`].
//! * Leases: a reply with a `lease_id` (dynamic credentials) is kept per path: every
//!   field of it (username AND password) comes from the same lease while it is valid,
//!   also across separate `get`s, and [`SecretProvider::get_many`] reads a path once
//!   for all its fields. Values are reported to expire before the lease must no longer
//!   be used (its end minus a margin of a fifth of its TTL, 1 s to 30 s) and, while the
//!   lease can be renewed, at half its TTL: the next fetch then renews it (`PUT
//!   sys/leases/renew`), so a lease in use is kept alive and an unused one runs out.
//!   A renewal that grants less than asked means the lease's max TTL is near: a new
//!   lease is taken before the end. A superseded lease is revoked (`PUT
//!   sys/leases/revoke`) after a grace period (the margin; the connections it opened
//!   are authenticated already); with `revokeOnShutdown` every lease is revoked when
//!   the daemon stops ([`SecretProvider::shutdown`]).
//! * A value fetched again for a field handed out less than 5 s before is a `fresh`
//!   fetch (the upstream rejected it): the lease is checked with Vault (renewed, or
//!   looked up), and replaced when Vault no longer has it.
//! * Errors: 404 not found; 403 (after a new login, when the token was dead) denied;
//!   5xx, 429 unreachable; redirects, non-JSON and oversized (1 MiB) replies, missing
//!   fields are bad replies; Vault's error text is repeated only sanitised and short.

mod client;
pub mod id;
pub mod settings;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use reqwest::Method;
use tokio::{task::JoinSet, time::Instant};

use self::{
    client::{Client, Fail},
    id::{FieldError, VaultId, select, wipe_json},
    settings::Auth,
};
use super::{BoxFuture, Fetched, SecretError, SecretProvider};
use crate::{
    config::{VaultAuthConfig, VaultProviderConfig, VaultValue},
    secret::Secret,
};

/// A value fetched again within this time of being handed out was rejected upstream
/// (the store's `fresh` fetch): its lease is checked with Vault.
const FRESH_WINDOW: Duration = Duration::from_secs(5);
/// At most one such check per lease in this time.
const VALIDATE_EVERY: Duration = Duration::from_secs(5);
/// A fetch this close to a lease's renewal point renews it.
const DUE_SLACK: Duration = Duration::from_millis(250);
/// How long a path whose mount could not be looked up is read as written before the
/// look-up is tried again.
const UNKNOWN_MOUNT_FOR: Duration = Duration::from_secs(300);
/// Bound of the lease revocations at shutdown (each request has its own timeout too).
const SHUTDOWN_BOUND: Duration = Duration::from_secs(12);

pub struct VaultProvider {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    /// Err: the built-in instance could not be set up from the environment (why).
    client: Result<Arc<Client>, String>,
    warned: AtomicBool,
    revoke_on_shutdown: bool,
    mounts: Mutex<Mounts>,
    /// API path -> the lease last read there (one fetch per path at a time).
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Lease>>>>>,
    /// Superseded leases waiting for their revocation.
    retired: Mutex<HashSet<String>>,
    tasks: Mutex<JoinSet<()>>,
}

#[derive(Default)]
struct Mounts {
    /// (mount path without slashes, is KV v2).
    known: Vec<(String, bool)>,
    /// Paths whose mount look-up failed -> until when they are read as written.
    unknown: HashMap<String, Instant>,
}

/// One lease: a dynamic secret's values and its lifetime.
struct Lease {
    id: String,
    /// The reply's `data`, as JSON.
    data: Secret,
    /// The TTL at creation: the increment asked at renewal, and the margin's base.
    first: Duration,
    /// The TTL of the last grant (creation or renewal), from `renewed`.
    granted: Duration,
    renewed: Instant,
    renewable: bool,
    /// A renewal granted less than asked: the max TTL is near.
    capped: bool,
    /// The token generation that read it (Vault revokes a token's leases with it).
    generation: u64,
    /// When Vault last confirmed it after a refetch (or renewed it).
    validated: Option<Instant>,
    /// Field -> when a value of it was last handed out.
    handed: HashMap<String, Instant>,
}

impl Lease {
    fn expires(&self) -> Instant {
        self.renewed + self.granted
    }

    /// Kept between the last hand-out and the lease's end (connections authenticating
    /// with it), and the grace before a superseded lease is revoked.
    fn margin(&self) -> Duration {
        (self.first / 5)
            .clamp(Duration::from_secs(1), Duration::from_secs(30))
            .min(self.first / 2)
    }

    /// When the lease should be renewed, if it can be.
    fn renew_at(&self) -> Option<Instant> {
        (self.renewable && !self.capped).then(|| self.renewed + self.granted / 2)
    }
}

/// One id of a `get_many`, on its resolved path.
struct Want<'a> {
    /// Position in the caller's list.
    pos: usize,
    id: &'a str,
    /// The field to read in the reply's `data` (KV v2 ids get `data.`).
    field: String,
}

enum Check {
    Valid,
    /// Vault no longer has the lease.
    Gone,
    /// Could not tell (Vault unreachable, not allowed to look up).
    Unknown,
}

fn process_env(name: &str) -> Option<String> {
    std::env::var_os(name).and_then(|v| v.into_string().ok())
}

impl VaultProvider {
    /// Build the instance from its keys and the process environment.
    ///
    /// # Errors
    /// For a declared instance: an unusable variable, no token for the `token`
    /// method, an unreadable token, secret or CA file. The built-in instance (not
    /// declared) never fails here; its fetches fail instead, with the reason logged.
    pub fn new(name: &str, cfg: &VaultProviderConfig) -> anyhow::Result<Self> {
        Self::with_env(name, cfg, &process_env)
    }

    /// [`VaultProvider::new`] with `env` as the environment.
    ///
    /// # Errors
    /// As [`VaultProvider::new`].
    pub fn with_env(
        name: &str,
        cfg: &VaultProviderConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let client = settings::resolve(cfg, env).and_then(|s| {
            if cfg.declared {
                check_files(cfg, &s.auth)?;
            }
            Client::new(name, &s).map(|c| (Arc::new(c), s))
        });
        let (client, revoke_on_shutdown) = match client {
            Ok((c, s)) => {
                tracing::debug!(
                    provider = name,
                    address = %s.address,
                    namespace = s.namespace.as_deref().unwrap_or(""),
                    method = s.auth.method(),
                    "Vault provider ready"
                );
                (Ok(c), s.revoke_on_shutdown)
            }
            Err(reason) if cfg.declared => anyhow::bail!("provider {name}: {reason}"),
            Err(reason) => (Err(reason), false),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                client,
                warned: AtomicBool::new(false),
                revoke_on_shutdown,
                mounts: Mutex::new(Mounts::default()),
                slots: Mutex::new(HashMap::new()),
                retired: Mutex::new(HashSet::new()),
                tasks: Mutex::new(JoinSet::new()),
            }),
        })
    }

    /// Revoke every lease this instance holds (current and superseded), whatever
    /// `revokeOnShutdown` says. Returns how many Vault revoked.
    pub async fn revoke_all(&self) -> usize {
        self.inner.revoke_all().await
    }
}

/// A declared instance fails at start on what it will need at its first fetch: a
/// token, readable token, secret and JWT files.
fn check_files(cfg: &VaultProviderConfig, auth: &Auth) -> Result<(), String> {
    let readable = |p: &std::path::Path, what: &str| {
        std::fs::metadata(p)
            .and_then(|_| std::fs::File::open(p).map(|_| ()))
            .map_err(|e| format!("cannot read {what} {}: {e}", p.display()))
    };
    match auth {
        Auth::Token(None) => Err(
            "no Vault token: set `token`, `tokenFile` or `auth`, or VAULT_TOKEN in the \
             environment"
                .into(),
        ),
        Auth::Token(Some(_)) => Ok(()),
        Auth::TokenFile(p) => readable(p, "tokenFile"),
        Auth::Kubernetes { jwt_file, .. } => readable(jwt_file, "auth.jwtFile"),
        Auth::AppRole { .. } => {
            if let VaultAuthConfig::AppRole {
                role_id, secret_id, ..
            } = &cfg.auth
            {
                if let VaultValue::File(p) = role_id {
                    readable(p, "auth.roleIdFile")?;
                }
                if let Some(VaultValue::File(p)) = secret_id {
                    readable(p, "auth.secretIdFile")?;
                }
            }
            Ok(())
        }
    }
}

impl Drop for VaultProvider {
    fn drop(&mut self) {
        // The tasks hold the inner state; end them with the provider.
        self.inner.tasks_lock().abort_all();
        if let Ok(c) = &self.inner.client {
            c.stop();
        }
    }
}

impl Inner {
    fn tasks_lock(&self) -> MutexGuard<'_, JoinSet<()>> {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn mounts_lock(&self) -> MutexGuard<'_, Mounts> {
        self.mounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn retired_lock(&self) -> MutexGuard<'_, HashSet<String>> {
        self.retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn err(&self, id: &str, f: Fail) -> SecretError {
        if matches!(f, Fail::NotConfigured) && !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                provider = %self.name,
                "no Vault token: set VAULT_TOKEN, or declare the instance under providers: \
                 with token, tokenFile or auth"
            );
        }
        f.into_error(&self.name, id)
    }

    async fn get_many(self: &Arc<Self>, ids: &[&str]) -> Result<Vec<Fetched>, SecretError> {
        let Some(first) = ids.first() else {
            return Ok(Vec::new());
        };
        let client = match &self.client {
            Ok(c) => Arc::clone(c),
            Err(reason) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(provider = %self.name, %reason, "the Vault provider is not usable");
                }
                return Err(Fail::NotConfigured.into_error(&self.name, first));
            }
        };
        // Parse and resolve every id; group them by API path, in order.
        let mut groups: Vec<(String, Vec<Want<'_>>)> = Vec::new();
        for (pos, &id) in ids.iter().enumerate() {
            let parsed = VaultId::parse(id).map_err(|r| self.err(id, Fail::BadId(r)))?;
            let target = self
                .resolve(&client, &parsed)
                .await
                .map_err(|f| self.err(id, f))?;
            let want = Want {
                pos,
                id,
                field: target.field,
            };
            match groups.iter_mut().find(|(p, _)| *p == target.path) {
                Some((_, wants)) => wants.push(want),
                None => groups.push((target.path, vec![want])),
            }
        }
        let mut out: Vec<Option<Fetched>> = vec![None; ids.len()];
        for (path, wants) in &groups {
            let fetched = self
                .fetch_path(&client, path, wants)
                .await
                .map_err(|(i, f)| self.err(wants[i].id, f))?;
            for (w, f) in wants.iter().zip(fetched) {
                out[w.pos] = Some(f);
            }
        }
        out.into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.err(first, Fail::BadReply("a value is missing".into())))
    }

    /// The API path and field of `id`: as written, or on a KV v2 mount with `data/`.
    async fn resolve(&self, client: &Arc<Client>, id: &VaultId) -> Result<VaultId, Fail> {
        if id.has_data_segment() {
            return Ok(id.clone());
        }
        let now = Instant::now();
        {
            let m = self.mounts_lock();
            let known = m
                .known
                .iter()
                .filter(|(mount, _)| {
                    id.path == *mount
                        || id
                            .path
                            .strip_prefix(mount.as_str())
                            .is_some_and(|r| r.starts_with('/'))
                })
                .max_by_key(|(mount, _)| mount.len());
            if let Some((mount, kv2)) = known {
                return on_mount(id, mount, *kv2);
            }
            if m.unknown.get(&id.path).is_some_and(|until| now < *until) {
                return Ok(id.clone());
            }
        }
        // What `vault kv get` asks first: which mount the path is on, and its version.
        let r = client
            .call(
                Method::GET,
                &format!("sys/internal/ui/mounts/{}", id.path),
                None,
            )
            .await?;
        let found = if r.ok() {
            r.json().ok().and_then(|mut j| {
                let d = &j["data"];
                let mount = d["path"]
                    .as_str()
                    .unwrap_or("")
                    .trim_matches('/')
                    .to_owned();
                let kv2 = d["type"].as_str() == Some("kv")
                    && d["options"]["version"].as_str() == Some("2");
                wipe_json(&mut j);
                (!mount.is_empty()).then_some((mount, kv2))
            })
        } else {
            None
        };
        let mut m = self.mounts_lock();
        match found {
            Some((mount, kv2)) => {
                if !m.known.iter().any(|(k, _)| *k == mount) {
                    m.known.push((mount.clone(), kv2));
                }
                drop(m);
                on_mount(id, &mount, kv2)
            }
            None => {
                m.unknown.retain(|_, until| now < *until);
                m.unknown.insert(id.path.clone(), now + UNKNOWN_MOUNT_FOR);
                Ok(id.clone())
            }
        }
    }

    fn slot(&self, path: &str) -> Arc<tokio::sync::Mutex<Option<Lease>>> {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(slots.entry(path.to_owned()).or_default())
    }

    /// Until when a lease's values may be handed out: its end (or its token's) minus
    /// the margin.
    fn use_until(client: &Client, l: &Lease) -> Instant {
        let m = l.margin();
        let mut end = l.expires();
        if let Some(token_end) = client.generation_end(l.generation) {
            end = end.min(token_end);
        }
        end.checked_sub(m).unwrap_or(end)
    }

    /// The values of `wants` (all on `path`): from the lease kept for the path when it
    /// is still usable (renewed when due), else from one read. Err: (index into
    /// `wants` of the id to name, failure).
    async fn fetch_path(
        self: &Arc<Self>,
        client: &Arc<Client>,
        path: &str,
        wants: &[Want<'_>],
    ) -> Result<Vec<Fetched>, (usize, Fail)> {
        let slot = self.slot(path);
        let mut kept = slot.lock().await;
        let now = Instant::now();
        if let Some(l) = kept.take_if(|l| now >= Self::use_until(client, l)) {
            self.retire(client, l);
        }
        if let Some(l) = kept.as_mut() {
            let fresh = wants.iter().any(|w| {
                l.handed
                    .get(&w.field)
                    .is_some_and(|&t| now.saturating_duration_since(t) < FRESH_WINDOW)
            });
            // The cache counts a value's life from a moment before we computed it:
            // a fetch just short of the renewal point is that entry expiring.
            let due = l.renew_at().is_some_and(|t| now + DUE_SLACK >= t);
            let may_validate = l
                .validated
                .is_none_or(|t| now.saturating_duration_since(t) >= VALIDATE_EVERY);
            if (due || (fresh && may_validate))
                && let Check::Gone = self.check(client, l, fresh && !due).await
            {
                tracing::info!(provider = %self.name, path, "the Vault lease is gone; taking a new one");
                *kept = None;
            }
            if let Some(l) = kept.take_if(|l| Instant::now() >= Self::use_until(client, l)) {
                self.retire(client, l);
            }
        }
        if let Some(l) = kept.as_mut() {
            return hand_out(client, l, wants);
        }
        let (r, generation) = client
            .call_gen(Method::GET, path, None)
            .await
            .map_err(|f| (0, f))?;
        if !r.ok() {
            return Err((0, client.status_fail(&r)));
        }
        let mut json = r.json().map_err(|f| (0, f))?;
        let lease_id = json["lease_id"].as_str().unwrap_or("").to_owned();
        let ttl = Duration::from_secs(json["lease_duration"].as_u64().unwrap_or(0));
        let renewable = json["renewable"].as_bool().unwrap_or(false);
        let mut data = json
            .get_mut("data")
            .map(serde_json::Value::take)
            .unwrap_or_default();
        wipe_json(&mut json);
        if !data.is_object() {
            wipe_json(&mut data);
            return Err((
                0,
                Fail::BadReply(format!("HTTP {}: the reply has no `data` object", r.status)),
            ));
        }
        if lease_id.is_empty() || ttl.is_zero() {
            // A static secret (KV): nothing kept; KV v1's lease_duration is the TTL
            // hint its writer set.
            let out = wants
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let v = pick(&data, w).map_err(|f| (i, f))?;
                    Ok(match ttl.is_zero() {
                        true => Fetched::new(v),
                        false => Fetched::expiring(v, ttl),
                    })
                })
                .collect();
            wipe_json(&mut data);
            return out;
        }
        let bytes = serde_json::to_vec(&data).unwrap_or_default();
        wipe_json(&mut data);
        let now = Instant::now();
        let lease = kept.insert(Lease {
            id: lease_id,
            data: Secret::new(bytes),
            first: ttl,
            granted: ttl,
            renewed: now,
            renewable,
            capped: false,
            generation,
            validated: None,
            handed: HashMap::new(),
        });
        tracing::info!(
            provider = %self.name,
            path,
            ttl_s = ttl.as_secs(),
            renewable,
            "Vault lease taken"
        );
        hand_out(client, lease, wants)
    }

    /// Renew the lease (or, not renewable, look it up).
    async fn check(&self, client: &Arc<Client>, l: &mut Lease, validating: bool) -> Check {
        let renewing = l.renewable && !l.capped;
        let (path, body) = if renewing {
            (
                "sys/leases/renew",
                serde_json::json!({"lease_id": l.id, "increment": l.first.as_secs()}),
            )
        } else {
            ("sys/leases/lookup", serde_json::json!({"lease_id": l.id}))
        };
        let r = match client.call(Method::PUT, path, Some(&body)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(provider = %self.name, error = ?e, "checking a Vault lease failed");
                return Check::Unknown;
            }
        };
        if r.status == 400 || r.status == 404 {
            return Check::Gone;
        }
        if !r.ok() {
            tracing::warn!(provider = %self.name, error = ?client.status_fail(&r), "checking a Vault lease failed");
            return Check::Unknown;
        }
        let now = Instant::now();
        l.validated = Some(now);
        if renewing {
            let Ok(mut j) = r.json() else {
                return Check::Unknown;
            };
            let granted = Duration::from_secs(j["lease_duration"].as_u64().unwrap_or(0));
            l.renewable = j["renewable"].as_bool().unwrap_or(false);
            wipe_json(&mut j);
            l.granted = granted;
            l.renewed = now;
            // Vault caps a renewal at the max TTL: less than asked means the end is
            // near; a new lease is taken before it.
            l.capped = granted + Duration::from_secs(1) < l.first;
            tracing::debug!(
                provider = %self.name,
                ttl_s = granted.as_secs(),
                capped = l.capped,
                validating,
                "Vault lease renewed"
            );
        }
        Check::Valid
    }

    /// A superseded lease: revoked once the grace period is over (connections that
    /// are still authenticating with it finish).
    fn retire(self: &Arc<Self>, client: &Arc<Client>, l: Lease) {
        if client
            .generation_end(l.generation)
            .is_some_and(|end| end <= Instant::now())
        {
            // Its token is gone, and Vault revoked the lease with it.
            return;
        }
        let grace = l.margin();
        self.retired_lock().insert(l.id.clone());
        let (me, client, id) = (Arc::clone(self), Arc::clone(client), l.id);
        let mut tasks = self.tasks_lock();
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            tokio::time::sleep(grace).await;
            if me.retired_lock().remove(&id) {
                me.revoke(&client, &id).await;
            }
        });
    }

    /// `PUT sys/leases/revoke`. True when Vault no longer has the lease.
    async fn revoke(&self, client: &Arc<Client>, lease_id: &str) -> bool {
        let body = serde_json::json!({ "lease_id": lease_id });
        match client
            .call(Method::PUT, "sys/leases/revoke", Some(&body))
            .await
        {
            // 400: an unknown (expired, revoked) lease.
            Ok(r) if r.ok() || r.status == 400 => {
                tracing::debug!(provider = %self.name, "Vault lease revoked");
                true
            }
            Ok(r) => {
                tracing::warn!(provider = %self.name, error = ?client.status_fail(&r), "revoking a Vault lease failed");
                false
            }
            Err(e) => {
                tracing::warn!(provider = %self.name, error = ?e, "revoking a Vault lease failed");
                false
            }
        }
    }

    async fn revoke_all(&self) -> usize {
        let Ok(client) = &self.client else { return 0 };
        self.tasks_lock().abort_all();
        let mut ids: Vec<String> = self.retired_lock().drain().collect();
        let slots: Vec<_> = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for slot in slots {
            // A fetch in flight finishes first (bounded by the store's fetch timeout).
            let Ok(mut kept) = tokio::time::timeout(Duration::from_secs(5), slot.lock()).await
            else {
                continue;
            };
            if let Some(l) = kept.take()
                && client
                    .generation_end(l.generation)
                    .is_none_or(|end| end > Instant::now())
            {
                ids.push(l.id);
            }
        }
        let mut revoked = 0;
        for id in &ids {
            if self.revoke(client, id).await {
                revoked += 1;
            }
        }
        if !ids.is_empty() {
            tracing::info!(provider = %self.name, revoked, of = ids.len(), "Vault leases revoked");
        }
        revoked
    }

    async fn shutdown(&self) {
        if self.revoke_on_shutdown {
            let _ = tokio::time::timeout(SHUTDOWN_BOUND, self.revoke_all()).await;
        }
        self.tasks_lock().abort_all();
        if let Ok(c) = &self.client {
            c.stop();
        }
    }
}

/// The id on its mount: KV v2 ids without `/data/` get it.
fn on_mount(id: &VaultId, mount: &str, kv2: bool) -> Result<VaultId, Fail> {
    if !kv2 {
        return Ok(id.clone());
    }
    id.on_kv2(mount).ok_or_else(|| {
        Fail::BadId(format!(
            "`{mount}` is a KV v2 mount; name a secret under it (`{mount}/NAME#FIELD`)"
        ))
    })
}

/// The field `w` asks for in `data`, as a secret.
fn pick(data: &serde_json::Value, w: &Want<'_>) -> Result<Secret, Fail> {
    match select(data, &w.field) {
        Ok(v) => Ok(Secret::new(v)),
        Err(FieldError::Null) => Err(Fail::BadReply(format!("field `{}` is null", w.field))),
        Err(FieldError::Missing) => {
            let mut reason = format!("field `{}` is not in the secret", w.field);
            // Secretless' KV v2 form read without `data.`: say where the fields are.
            if !w.field.starts_with("data.")
                && data.get("data").is_some_and(serde_json::Value::is_object)
                && data.get("metadata").is_some()
            {
                reason.push_str(&format!(
                    " (a KV v2 reply holds the secret under `data`: `#data.{}`)",
                    w.field
                ));
            }
            Err(Fail::BadReply(reason))
        }
    }
}

/// The lease's values for `wants`, reported to expire when the lease must next be
/// renewed, or no longer be used.
fn hand_out(
    client: &Client,
    l: &mut Lease,
    wants: &[Want<'_>],
) -> Result<Vec<Fetched>, (usize, Fail)> {
    let now = Instant::now();
    let until = Inner::use_until(client, l);
    let deadline = match l.renew_at() {
        Some(t) if t > now => until.min(t),
        _ => until,
    };
    let expires_in = deadline.saturating_duration_since(now);
    let mut data: serde_json::Value = serde_json::from_slice(l.data.expose())
        .map_err(|_| (0, Fail::BadReply("the kept lease data is not JSON".into())))?;
    let out = wants
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let v = pick(&data, w).map_err(|f| (i, f))?;
            l.handed.insert(w.field.clone(), now);
            Ok(Fetched::expiring(v, expires_in))
        })
        .collect();
    wipe_json(&mut data);
    out
}

impl SecretProvider for VaultProvider {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Fetched, SecretError>> {
        Box::pin(async move {
            let mut v = self.inner.get_many(&[id]).await?;
            v.pop()
                .ok_or_else(|| Fail::BadReply("no value".into()).into_error(&self.inner.name, id))
        })
    }

    fn get_many<'a>(
        &'a self,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<Fetched>, SecretError>> {
        Box::pin(self.inner.get_many(ids))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.inner.shutdown())
    }
}
