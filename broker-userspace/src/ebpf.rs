//! Loading, attaching and feeding the kernel programs (`broker-ebpf`).
//!
//! [`Interceptor`] owns the loaded object. Every cgroup program is attached with a BPF
//! link (`bpf_link_create`), so the attachments live exactly as long as some process
//! holds the link fds: this one (dropping the `Interceptor`, any error path, and even
//! SIGKILL detach everything), and, under a service manager with a descriptor store,
//! the service manager too, across a restart (see `fdstore`). The splice programs (only
//! when a service splices) are attached to their sockhashes, which live in this process
//! and its spliced sessions ([`Splicer`]); when the last reference goes, the maps release
//! their sockets. Nothing is pinned in bpffs.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, MapData, PerCpuHashMap, RingBuf, SockHash,
        lpm_trie::Key,
    },
    programs::{
        CgroupSockAddr, RawTracePoint, SkMsg, SkSkb, SockOps, raw_trace_point::RawTracePointLink,
    },
};
use broker_common::{
    AddrKey, BrokerSettings, CidrKey, ConnKey, ConnRecord, GLOBAL_PIDNS_DEV, GLOBAL_PIDNS_INO,
    GLOBAL_SK_COOKIE, GLOBAL_SK_SNDBUF, GLOBAL_SK_SOCKET, GLOBAL_SK_WMEM_QUEUED, GLOBAL_SKB_CB,
    GLOBAL_SOCKET_FILE, GLOBAL_SOCKET_SK, MAP_BY_CONN, MAP_BY_COOKIE, MAP_REDIRECTS, MAP_SETTINGS,
    MAP_SPLICE, MAP_SPLICE_APP, MAP_SPLICE_EVENTS, MAP_SPLICE_READ, MAP_SPLICE_UP,
    MAP_TARGET_CIDRS, MAP_TARGET_PORTS, MAP_TARGETS, PortBits, REC_IN_SPLICE_APP, SPLICE_FALLBACK,
    SPLICE_INGRESS, SPLICE_MYSQL, SockKey, SpliceValue, TARGET_SPLICE, TargetValue, mapped_v4,
    port_slot,
};
use tokio::sync::Notify;

use crate::btf::{Btf as KernelBtf, SockOffsets};

/// The eBPF object built by `build.rs` (aya-build) from `broker-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/broker"));

/// Programs in attach order, with their hooks: the bookkeeping ones first, the
/// redirecting ones last, so a connection is never redirected before its record can be
/// found.
const PROGRAMS: [(&str, u32); 5] = {
    use crate::sys::attach_type as at;
    [
        ("broker_sock_ops", at::CGROUP_SOCK_OPS),
        ("broker_getpeername4", at::CGROUP_INET4_GETPEERNAME),
        ("broker_getpeername6", at::CGROUP_INET6_GETPEERNAME),
        ("broker_connect4", at::CGROUP_INET4_CONNECT),
        ("broker_connect6", at::CGROUP_INET6_CONNECT),
    ]
};

/// How long the redirect records of a previous process (handed over through the
/// service manager's descriptor store) are looked up: as long as a record is trusted.
const PREVIOUS_RECORDS_FOR: std::time::Duration = crate::proxy::MAX_RECORD_AGE;

/// What a previous daemon process left attached, handed over by the service manager
/// (see `fdstore`).
#[derive(Debug, Default)]
pub struct Previous {
    /// Its BPF links: closed once this process's programs are attached.
    pub links: Vec<OwnedFd>,
    /// Its redirect-record map: connections its programs redirected and nobody accepted
    /// yet (queued in the listener's backlog across the restart).
    pub records: Option<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "loading the eBPF object: {0} (needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; kernel >= 5.14)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("eBPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("socket cookie: {0}")]
    Socket(#[source] std::io::Error),
    #[error(
        "reading this process's network namespace cookie (SO_NETNS_COOKIE, kernel >= 5.14): {0}"
    )]
    Netns(#[source] std::io::Error),
    #[error("attaching {name} to the cgroup: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A target as the kernel sees it: exact address or CIDR, always with a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelTarget {
    Exact(IpAddr, u16),
    Cidr(IpAddr, u8, u16),
}

fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => mapped_v4(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// An address as the kernel programs store it: IPv4 (or IPv4-mapped IPv6) as
/// `::ffff:a.b.c.d`.
fn norm16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.octets(), |v4| mapped_v4(v4.octets())),
        IpAddr::V4(v4) => mapped_v4(v4.octets()),
    }
}

/// The key under which sock_ops recorded the app socket of a connection the broker
/// accepted in namespace `netns_cookie` from `peer` on its listener address `local`:
/// the app socket's own 4-tuple is ours reversed.
#[must_use]
pub fn conn_key(netns_cookie: u64, peer: SocketAddr, local: SocketAddr) -> ConnKey {
    ConnKey {
        netns_cookie,
        sock: sock_key(peer, local),
        _pad: 0,
    }
}

use crate::sys::sockopt_u64;

/// Take the record under `key` out of a redirect-record map (ours, or the previous
/// process's): one
/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` where the kernel has it for hash maps (5.14),
/// else a lookup and a delete.
fn take(records: &mut RecordMap, key: &ConnKey) -> Option<ConnRecord> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static TWO_CALLS: AtomicBool = AtomicBool::new(false);
    if !TWO_CALLS.load(Ordering::Relaxed) {
        match crate::sys::bpf_map_take(records.map().fd().as_fd(), key) {
            Ok(rec) => return rec,
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                TWO_CALLS.store(true, Ordering::Relaxed);
            }
            Err(_) => return None,
        }
    }
    let rec = records.get(key, 0).ok()?;
    let _ = records.remove(key);
    Some(rec)
}

/// The socket's cookie, the same the kernel programs get from `bpf_get_socket_cookie`.
///
/// # Errors
/// The getsockopt failure.
pub fn socket_cookie(fd: &impl AsRawFd) -> std::io::Result<u64> {
    sockopt_u64(fd, libc::SO_COOKIE)
}

/// The cookie of this process's network namespace (what `bpf_get_netns_cookie` returns
/// for its sockets).
///
/// # Errors
/// The socket or getsockopt failure (kernels before 5.14 have no `SO_NETNS_COOKIE`).
pub fn own_netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    sockopt_u64(&s, SO_NETNS_COOKIE)
}

/// The [`SockKey`] of a socket with this local and remote address, as the kernel
/// programs build it from their context.
#[must_use]
pub fn sock_key(local: SocketAddr, remote: SocketAddr) -> SockKey {
    SockKey {
        local: norm16(local.ip()),
        remote: norm16(remote.ip()),
        local_port: local.port(),
        remote_port: remote.port(),
    }
}

/// The original destination stored in a record.
#[must_use]
pub fn record_destination(rec: &ConnRecord) -> SocketAddr {
    let v6 = std::net::Ipv6Addr::from(rec.orig_addr);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    SocketAddr::new(ip, rec.orig_port)
}

struct Targets {
    exact: HashMap<MapData, AddrKey, TargetValue>,
    cidrs: LpmTrie<MapData, CidrKey, TargetValue>,
    /// The ports some target names (`TARGET_PORTS`): connect4/6 look a destination up
    /// only if its port is there.
    ports: Array<MapData, PortBits>,
    /// What this process last wrote in `ports` (entries not here are zero).
    port_bits: BTreeMap<u32, PortBits>,
    current: BTreeMap<KernelTarget, u32>,
    /// Services whose sessions may be spliced in the kernel.
    splice_services: BTreeSet<u32>,
    /// Whether the splice programs are attached (then a reload may mark more services).
    splicing: bool,
    /// The configuration generation every target carries (see `runtime`).
    generation: u32,
}

/// The redirect records, by the app socket's key.
type RecordMap = HashMap<MapData, ConnKey, ConnRecord>;

/// A second descriptor of one of the programs' maps, for counting its entries at scrape
/// time without taking the lock the data path uses for that map.
struct MapView {
    name: &'static str,
    fd: OwnedFd,
    key_size: usize,
    /// For batch lookups: a plain (not per-CPU) hash map's value size.
    batch_value_size: Option<usize>,
    capacity: u32,
}

impl MapView {
    fn of(name: &'static str, data: &MapData) -> Option<Self> {
        let info = data.info().ok()?;
        let batch = matches!(
            info.map_type(),
            Ok(aya::maps::MapType::Hash | aya::maps::MapType::LruHash)
        );
        Some(Self {
            name,
            fd: data.fd().as_fd().try_clone_to_owned().ok()?,
            key_size: info.key_size() as usize,
            batch_value_size: batch.then_some(info.value_size() as usize),
            capacity: info.max_entries(),
        })
    }

    /// Its entries, at most `cap`: in batches where the map type allows, else key by key
    /// (at most `key_cap` then: one system call per key).
    fn count(&self, cap: usize, key_cap: usize) -> Option<u64> {
        let fd = self.fd.as_fd();
        if let Some(v) = self.batch_value_size
            && let Ok(n) = crate::sys::bpf_map_count_batch(fd, self.key_size, v, cap)
        {
            return Some(n as u64);
        }
        crate::sys::bpf_map_count_keys(fd, self.key_size, key_cap.min(cap))
            .ok()
            .map(|n| n as u64)
    }
}

/// How full one of the programs' maps is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapOccupancy {
    pub name: &'static str,
    /// Entries counted, at most the walk's cap.
    pub entries: u64,
    /// The map's capacity (`max_entries`).
    pub capacity: u32,
}

/// The loaded and attached kernel programs and their maps.
pub struct Interceptor {
    /// The cgroup attachments (dropped first: detached before anything else goes).
    links: Vec<OwnedFd>,
    records: Mutex<HashMap<MapData, ConnKey, ConnRecord>>,
    /// A second descriptor of `records`, for the service manager's store.
    records_fd: OwnedFd,
    /// The previous process's records, while they can still be trusted.
    previous: Mutex<Option<(RecordMap, std::time::Instant)>>,
    /// Service id -> connects redirected, per CPU.
    redirects: PerCpuHashMap<MapData, u32, u64>,
    /// Descriptors of the maps whose entries `/metrics` counts.
    views: Vec<MapView>,
    /// The namespace whose sockets are redirected (this process's).
    netns_cookie: u64,
    splicer: Arc<Splicer>,
    targets: Mutex<Targets>,
    settings: Mutex<Array<MapData, BrokerSettings>>,
    cgroup: PathBuf,
    ebpf: Ebpf,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

/// The program `name` of the object, as its concrete type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(EbpfError::Program {
            name,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(prog_err(name))
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, source }
}

impl Interceptor {
    /// Load the programs, write the settings and targets, then attach to `cgroup`; then
    /// let go of what a previous process left attached (`previous`), keeping its records
    /// for the connections it redirected. On any error everything attached so far is
    /// detached (the object is dropped).
    ///
    /// # Errors
    /// Load, map or attach failures, naming the map or program.
    pub fn attach(
        cgroup: &Path,
        mut settings: BrokerSettings,
        targets: &BTreeMap<KernelTarget, u32>,
        splice_services: BTreeSet<u32>,
        generation: u32,
        previous: Previous,
    ) -> Result<Self, EbpfError> {
        // The kernel's BTF, read once: aya relocates with it (as `Ebpf::load` does), and
        // the splice programs read fields of `struct sock` at offsets found in it.
        // Without them nothing is spliced.
        let kernel_btf = KernelBtf::from_sys_fs();
        let btf = kernel_btf
            .as_ref()
            .ok()
            .and_then(|b| aya::Btf::parse(b.data(), aya::Endianness::default()).ok());
        // `sock.sk_socket` and `socket.file`: connect4/6 leave the kernel's own sockets
        // (MPTCP subflows, SMC) alone (see broker-ebpf). Without BTF they cannot tell
        // them apart (documented).
        let (sk_socket_off, socket_file_off, socket_sk_off) = kernel_btf
            .as_ref()
            .ok()
            .and_then(|b| {
                Some((
                    b.member_offset("sock", "sk_socket").ok()?,
                    b.member_offset("socket", "file").ok()?,
                    b.member_offset("socket", "sk").ok()?,
                ))
            })
            .unwrap_or((0, 0, 0));
        let offsets = if splice_services.is_empty() {
            None
        } else {
            kernel_btf
                .and_then(|b| SockOffsets::from_btf(&b))
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "no kernel BTF: sessions are relayed in userspace, not spliced");
                })
                .ok()
        };
        // The daemon's own connects (`settings.bypass_tgid` is its pid): recognised in
        // its own pid namespace where the kernel allows it (see `pidns`).
        let own = crate::pidns::OwnTraffic::detect(settings.bypass_tgid);
        own.log(settings.bypass_mark);
        let (pidns_dev, pidns_ino, bypass_tgid) = own.program_values();
        settings.bypass_tgid = bypass_tgid;
        let mut loader = EbpfLoader::new();
        loader.btf(btf.as_ref());
        loader
            .override_global(GLOBAL_SK_SOCKET, &sk_socket_off, true)
            .override_global(GLOBAL_SOCKET_FILE, &socket_file_off, true)
            .override_global(GLOBAL_SOCKET_SK, &socket_sk_off, true)
            .override_global(GLOBAL_PIDNS_DEV, &pidns_dev, true)
            .override_global(GLOBAL_PIDNS_INO, &pidns_ino, true);
        if let Some(o) = &offsets {
            loader
                .override_global(GLOBAL_SK_WMEM_QUEUED, &o.wmem_queued, true)
                .override_global(GLOBAL_SK_SNDBUF, &o.sndbuf, true)
                .override_global(GLOBAL_SK_COOKIE, &o.cookie, true)
                .override_global(GLOBAL_SKB_CB, &o.skb_cb, true);
        }
        let mut ebpf = loader.load(OBJECT).map_err(EbpfError::Load)?;
        // Only this namespace's sockets are redirected: the listener is its loopback.
        settings.netns_cookie = own_netns_cookie().map_err(EbpfError::Netns)?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))
        };
        let mut settings_map: Array<MapData, BrokerSettings> =
            Array::try_from(take(&mut ebpf, MAP_SETTINGS)?).map_err(map_err(MAP_SETTINGS))?;
        settings_map
            .set(0, settings, 0)
            .map_err(map_err(MAP_SETTINGS))?;
        let records: HashMap<MapData, ConnKey, ConnRecord> =
            HashMap::try_from(take(&mut ebpf, MAP_BY_CONN)?).map_err(map_err(MAP_BY_CONN))?;
        let mut views = Vec::new();
        views.extend(MapView::of(MAP_BY_CONN, records.map()));
        // Only counted here, so left in the object. (No map may be closed before the
        // programs are loaded: their instructions name maps by descriptor number until
        // then, and a closed number is handed to the next descriptor opened.)
        if let Some(aya::maps::Map::LruHashMap(d) | aya::maps::Map::HashMap(d)) =
            ebpf.map(MAP_BY_COOKIE)
        {
            views.extend(MapView::of(MAP_BY_COOKIE, d));
        }
        let redirects: PerCpuHashMap<MapData, u32, u64> =
            PerCpuHashMap::try_from(take(&mut ebpf, MAP_REDIRECTS)?)
                .map_err(map_err(MAP_REDIRECTS))?;
        views.extend(MapView::of(MAP_REDIRECTS, redirects.map()));
        let mut splicer = Splicer {
            app: Mutex::new(
                SockHash::try_from(take(&mut ebpf, MAP_SPLICE_APP)?)
                    .map_err(map_err(MAP_SPLICE_APP))?,
            ),
            up: Mutex::new(
                SockHash::try_from(take(&mut ebpf, MAP_SPLICE_UP)?)
                    .map_err(map_err(MAP_SPLICE_UP))?,
            ),
            entries: Mutex::new(
                HashMap::try_from(take(&mut ebpf, MAP_SPLICE)?).map_err(map_err(MAP_SPLICE))?,
            ),
            read: Mutex::new(
                HashMap::try_from(take(&mut ebpf, MAP_SPLICE_READ)?)
                    .map_err(map_err(MAP_SPLICE_READ))?,
            ),
            events: Mutex::new(Some(
                RingBuf::try_from(take(&mut ebpf, MAP_SPLICE_EVENTS)?)
                    .map_err(map_err(MAP_SPLICE_EVENTS))?,
            )),
            fallbacks: Mutex::new(std::collections::HashMap::new()),
            read_link: None,
        };
        // The splice programs go on their sockhashes before anything can put a socket
        // there: a socket takes the programs its map has when it is inserted.
        let mut splice_services = splice_services;
        let splicing = offsets.is_some()
            && splicer
                .attach_programs(&mut ebpf)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "kernel splice unavailable: sessions are relayed in userspace");
                })
                .is_ok();
        if !splicing {
            splice_services.clear();
        }
        let mut t = Targets {
            exact: HashMap::try_from(take(&mut ebpf, MAP_TARGETS)?)
                .map_err(map_err(MAP_TARGETS))?,
            cidrs: LpmTrie::try_from(take(&mut ebpf, MAP_TARGET_CIDRS)?)
                .map_err(map_err(MAP_TARGET_CIDRS))?,
            ports: Array::try_from(take(&mut ebpf, MAP_TARGET_PORTS)?)
                .map_err(map_err(MAP_TARGET_PORTS))?,
            port_bits: BTreeMap::new(),
            current: BTreeMap::new(),
            splice_services,
            splicing,
            generation,
        };
        t.update(targets, false)?;
        views.extend(MapView::of(MAP_TARGETS, t.exact.map()));
        views.extend(MapView::of(MAP_TARGET_CIDRS, t.cidrs.map()));
        views.extend(MapView::of(MAP_SPLICE_APP, lock(&splicer.app).map()));
        views.extend(MapView::of(MAP_SPLICE_UP, lock(&splicer.up).map()));
        views.extend(MapView::of(MAP_SPLICE, lock(&splicer.entries).map()));
        views.extend(MapView::of(MAP_SPLICE_READ, lock(&splicer.read).map()));

        let cg = std::fs::File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        // Links made here rather than by aya, so their descriptors can be handed to the
        // service manager (aya keeps a link's descriptor to itself).
        let mut links = Vec::with_capacity(PROGRAMS.len());
        for (name, hook) in PROGRAMS {
            let fd = if name == "broker_sock_ops" {
                let p: &mut SockOps = program(&mut ebpf, name)?;
                p.load().map_err(prog_err(name))?;
                p.fd().map_err(prog_err(name))?.as_fd()
            } else {
                let p: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                p.load().map_err(prog_err(name))?;
                p.fd().map_err(prog_err(name))?.as_fd()
            };
            links.push(
                crate::sys::bpf_link_create(fd, cg.as_fd(), hook)
                    .map_err(|source| EbpfError::Link { name, source })?,
            );
        }
        tracing::info!(cgroup = %cgroup.display(), programs = PROGRAMS.len(), "eBPF programs attached");
        // Ours are attached (after the previous process's, so those run first on each
        // connect and redirect it while both are there): the previous programs can go.
        // Their records stay readable for the connections they redirected.
        let handed = !previous.links.is_empty();
        drop(previous.links);
        let previous = previous.records.and_then(|fd| {
            HashMap::try_from(aya::maps::Map::LruHashMap(MapData::from_fd(fd).ok()?))
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "the previous process's redirect records are not a map this broker reads: connections it redirected are refused");
                })
                .ok()
                .map(|m| (m, std::time::Instant::now()))
        });
        if handed {
            tracing::info!(
                previous_records = previous.is_some(),
                "took over from the previous process: its programs are detached"
            );
        }
        let records_fd = records
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(EbpfError::Socket)?;
        Ok(Self {
            links,
            records: Mutex::new(records),
            records_fd,
            previous: Mutex::new(previous),
            redirects,
            views,
            netns_cookie: settings.netns_cookie,
            splicer: Arc::new(splicer),
            targets: Mutex::new(t),
            settings: Mutex::new(settings_map),
            cgroup: cgroup.to_path_buf(),
            ebpf,
        })
    }

    /// The cgroup the programs are attached to.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Replace the target set (adds new entries before removing stale ones).
    ///
    /// # Errors
    /// A map update failure (e.g. the map is full).
    pub fn set_targets(&self, targets: &BTreeMap<KernelTarget, u32>) -> Result<(), EbpfError> {
        lock(&self.targets).update(targets, false)
    }

    /// A reload: every target rewritten in place with the new configuration's
    /// generation and splice flags (entries are overwritten, never removed and
    /// re-added, so a connect in between finds either the old value or the new one),
    /// then the targets no longer wanted removed. Splicing is only marked when the splice
    /// programs were attached at start.
    ///
    /// # Errors
    /// A map update failure (e.g. the map is full).
    pub fn reconfigure(
        &self,
        targets: &BTreeMap<KernelTarget, u32>,
        splice_services: BTreeSet<u32>,
        generation: u32,
    ) -> Result<(), EbpfError> {
        let mut t = lock(&self.targets);
        t.splice_services = if t.splicing {
            splice_services
        } else {
            BTreeSet::new()
        };
        t.generation = generation;
        // Every value changes (the generation): rewrite them all, then remove the ones
        // no longer wanted.
        t.update(targets, true)
    }

    /// Look up and delete the record of the connection accepted on the transparent
    /// listener: sock_ops wrote it when the app socket at the other end, in this
    /// namespace, was established to our listener, and deletes it when that socket
    /// closes; so it names the one socket `accepted` is connected to.
    ///
    /// # Errors
    /// The accepted socket's addresses cannot be read (it is already gone).
    pub fn take_record(
        &self,
        accepted: &tokio::net::TcpStream,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
    ) -> std::io::Result<Option<ConnRecord>> {
        let peer = match peer {
            Some(p) => p,
            None => accepted.peer_addr()?,
        };
        let local = match local {
            Some(l) => l,
            None => accepted.local_addr()?,
        };
        let key = conn_key(self.netns_cookie, peer, local);
        let mut records = lock(&self.records);
        if let Some(rec) = take(&mut records, &key) {
            return Ok((rec.netns_cookie == self.netns_cookie).then_some(rec));
        }
        drop(records);
        Ok(self
            .take_previous(&key)
            .filter(|rec| rec.netns_cookie == self.netns_cookie))
    }

    /// A record the previous process's programs wrote (see [`Previous`]), served by this
    /// configuration only if it still intercepts the record's destination for the same
    /// service (ids are the services' names hashed): then it takes this configuration's
    /// generation. Never spliced: the socket was put in the previous process's maps.
    fn take_previous(&self, key: &ConnKey) -> Option<ConnRecord> {
        let mut previous = lock(&self.previous);
        let (map, since) = previous.as_mut()?;
        if since.elapsed() > PREVIOUS_RECORDS_FOR {
            *previous = None;
            return None;
        }
        let mut rec = take(map, key)?;
        drop(previous);
        let now = lock(&self.targets).lookup(record_destination(&rec))?;
        if now.service_id != rec.service_id {
            tracing::warn!(
                destination = %record_destination(&rec),
                "a connection redirected by the previous process is for a service this configuration no longer intercepts there"
            );
            return None;
        }
        rec.generation = now.generation;
        rec.flags &= !(TARGET_SPLICE | REC_IN_SPLICE_APP);
        Some(rec)
    }

    /// The descriptors a service manager keeps across a restart: the cgroup links and
    /// the redirect-record map.
    #[must_use]
    pub fn handover(&self) -> (Vec<BorrowedFd<'_>>, BorrowedFd<'_>) {
        (
            self.links.iter().map(AsFd::as_fd).collect(),
            self.records_fd.as_fd(),
        )
    }

    /// The splice maps; a spliced session keeps them (and so its kernel data path) alive
    /// after the daemon has detached, until the session ends.
    #[must_use]
    pub fn splicer(&self) -> Arc<Splicer> {
        Arc::clone(&self.splicer)
    }

    /// Connects redirected per service id since the programs were loaded, summed over
    /// the CPUs (the kernel's own count, `REDIRECTS`). At most [`broker_common::MAX_SERVICES`]
    /// entries are read.
    #[must_use]
    pub fn kernel_redirects(&self) -> Vec<(u32, u64)> {
        self.redirects
            .iter()
            .take(broker_common::MAX_SERVICES as usize)
            .filter_map(Result::ok)
            .map(|(id, per_cpu)| (id, per_cpu.iter().fold(0u64, |a, v| a.wrapping_add(*v))))
            .collect()
    }

    /// How many entries each of the programs' maps holds (targets, per-connection
    /// records, splice maps, the redirect counters): hash maps counted in batches (up to
    /// `cap` entries), the others (sockhashes, the LPM trie, the per-CPU counters) key by
    /// key, one `bpf(2)` call each, up to `key_cap`. The caller bounds how often this
    /// runs.
    #[must_use]
    pub fn map_occupancy(&self, cap: usize, key_cap: usize) -> Vec<MapOccupancy> {
        self.views
            .iter()
            .filter_map(|v| {
                Some(MapOccupancy {
                    name: v.name,
                    entries: v.count(cap, key_cap)?,
                    capacity: v.capacity,
                })
            })
            .collect()
    }

    /// Stop redirecting new connections (programs stay attached until drop).
    pub fn disable(&self) {
        let mut s = lock(&self.settings);
        if let Ok(mut cur) = s.get(&0, 0) {
            cur.flags = 0;
            let _ = s.set(0, cur, 0);
        }
    }

    /// Start forwarding kernel debug logs (aya-log) into our tracing output.
    ///
    /// # Errors
    /// When the object has no log map.
    pub fn kernel_logger(
        &mut self,
    ) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }
}

impl Targets {
    /// The target value a connect to `dst` finds, as the kernel programs look it up:
    /// the exact address first, then the longest matching prefix.
    fn lookup(&self, dst: SocketAddr) -> Option<TargetValue> {
        if let Ok(v) = self.exact.get(&exact_key(dst.ip(), dst.port()), 0) {
            return Some(v);
        }
        let key = Key::new(
            16 + 128,
            CidrKey {
                port_be: dst.port().to_be_bytes(),
                addr: norm16(dst.ip()),
            },
        );
        self.cidrs.get(&key, 0).ok()
    }

    /// Make the maps hold `want`: new and changed entries written (every one with
    /// `rewrite`) before stale ones are removed. The ports of the new targets are added
    /// to `TARGET_PORTS` before any entry is written, and the ports no target names any
    /// more leave it only after the stale entries are gone: a connect in between never
    /// finds a target's port missing.
    fn update(
        &mut self,
        want: &BTreeMap<KernelTarget, u32>,
        rewrite: bool,
    ) -> Result<(), EbpfError> {
        self.write_ports(&port_bits(self.current.keys().chain(want.keys())))?;
        for (t, &id) in want {
            if !rewrite && self.current.get(t) == Some(&id) {
                continue;
            }
            let v = TargetValue {
                service_id: id,
                flags: if self.splice_services.contains(&id) {
                    TARGET_SPLICE
                } else {
                    0
                },
                generation: self.generation,
                _pad: 0,
            };
            match *t {
                KernelTarget::Exact(ip, port) => self
                    .exact
                    .insert(exact_key(ip, port), v, 0)
                    .map_err(map_err(MAP_TARGETS))?,
                KernelTarget::Cidr(ip, len, port) => self
                    .cidrs
                    .insert(&cidr_key(ip, len, port), v, 0)
                    .map_err(map_err(MAP_TARGET_CIDRS))?,
            }
            self.current.insert(*t, id);
        }
        let stale: BTreeSet<KernelTarget> = self
            .current
            .keys()
            .filter(|t| !want.contains_key(t))
            .copied()
            .collect();
        for t in stale {
            self.remove(t);
            self.current.remove(&t);
        }
        self.write_ports(&port_bits(self.current.keys()))
    }

    /// Write the `TARGET_PORTS` entries that differ from `want` (absent: zero).
    fn write_ports(&mut self, want: &BTreeMap<u32, PortBits>) -> Result<(), EbpfError> {
        let slots: BTreeSet<u32> = self.port_bits.keys().chain(want.keys()).copied().collect();
        for slot in slots {
            let v = want.get(&slot).copied().unwrap_or_default();
            if self.port_bits.get(&slot).copied().unwrap_or_default() == v {
                continue;
            }
            self.ports
                .set(slot, v, 0)
                .map_err(map_err(MAP_TARGET_PORTS))?;
            if v == PortBits::default() {
                self.port_bits.remove(&slot);
            } else {
                self.port_bits.insert(slot, v);
            }
        }
        Ok(())
    }

    /// Delete one target's map entry (absent: nothing to do).
    fn remove(&mut self, t: KernelTarget) {
        match t {
            KernelTarget::Exact(ip, port) => {
                let _ = self.exact.remove(&exact_key(ip, port));
            }
            KernelTarget::Cidr(ip, len, port) => {
                let _ = self.cidrs.remove(&cidr_key(ip, len, port));
            }
        }
    }
}

/// The in-kernel data path of spliced sessions: the app sockets' sockhash (filled by
/// sock_ops), the upstream sockets' sockhash and the socket -> peer map (filled here).
pub struct Splicer {
    app: Mutex<SockHash<MapData, u64>>,
    up: Mutex<SockHash<MapData, u64>>,
    entries: Mutex<HashMap<MapData, u64, SpliceValue>>,
    /// App socket cookie -> bytes it read of what was redirected to it.
    read: Mutex<HashMap<MapData, u64, u64>>,
    /// Server -> app fallbacks reported by the kernel; taken by [`Splicer::watch_fallbacks`].
    events: Mutex<Option<RingBuf<MapData>>>,
    /// Sessions waiting for their fallback, by app socket cookie.
    fallbacks: Mutex<std::collections::HashMap<u64, Arc<Notify>>>,
    /// The read-counting program's link: it must count for as long as any session is
    /// spliced, which may be after the cgroup programs are gone (a drain).
    read_link: Option<RawTracePointLink>,
}

impl std::fmt::Debug for Splicer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splicer").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Splicer {
    /// Load and attach the three splice programs: the read counter first (nothing can be
    /// spliced yet), then the programs on their sockhashes.
    fn attach_programs(&mut self, ebpf: &mut Ebpf) -> Result<(), EbpfError> {
        let name = "broker_splice_read";
        let p: &mut RawTracePoint = program(ebpf, name)?;
        p.load().map_err(prog_err(name))?;
        let id = p.attach("sock_recv_length").map_err(prog_err(name))?;
        self.read_link = Some(p.take_link(id).map_err(prog_err(name))?);
        let name = "broker_splice_msg";
        let p: &mut SkMsg = program(ebpf, name)?;
        p.load().map_err(prog_err(name))?;
        p.attach(lock(&self.app).fd()).map_err(prog_err(name))?;
        let name = "broker_splice_skb";
        let p: &mut SkSkb = program(ebpf, name)?;
        p.load().map_err(prog_err(name))?;
        p.attach(lock(&self.up).fd()).map_err(prog_err(name))?;
        Ok(())
    }

    /// Hand each server -> app fallback the kernel reports (`SPLICE_EVENTS`) to its
    /// session. Runs for the daemon's lifetime; a no-op after the first call.
    pub async fn watch_fallbacks(self: Arc<Self>) {
        let Some(ring) = lock(&self.events).take() else {
            return;
        };
        let fd = crate::sys::async_readable(ring);
        let mut fd = match fd {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the splice fallback ring buffer");
                return;
            }
        };
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "splice fallback ring buffer");
                    return;
                }
            };
            while let Some(item) = guard.get_inner_mut().next() {
                let Ok(bytes) = <[u8; 8]>::try_from(&item[..item.len().min(8)]) else {
                    continue;
                };
                let cookie = u64::from_ne_bytes(bytes);
                if let Some(n) = lock(&self.fallbacks).get(&cookie) {
                    n.notify_one();
                }
            }
            guard.clear_ready();
        }
    }

    /// Splice the app socket with cookie `app` (in `SPLICE_APP` since sock_ops saw it
    /// connect) with the upstream socket `up`: from now on the app's sends leave through
    /// `up`, and what `up` receives lands in the app socket's receive queue. The returned
    /// guard undoes the map entries when dropped. `sent_after` is the bytes the caller
    /// writes to the app itself once this returns.
    ///
    /// Every entry is keyed by a socket cookie (never reused while the kernel runs) and
    /// inserted only if absent: nothing here can ever take over another socket's entry.
    ///
    /// # Errors
    /// A map update failure (a full map, an existing entry, or `up` not an established
    /// TCP socket). Nothing is left behind: the caller relays in userspace instead.
    pub fn start(
        self: &Arc<Self>,
        app: u64,
        sent_after: u64,
        up: &std::net::TcpStream,
        upload: UploadPath,
    ) -> Result<Spliced, EbpfError> {
        const BPF_NOEXIST: u64 = 1;
        let up_cookie = socket_cookie(up).map_err(EbpfError::Socket)?;
        let fallback = Arc::new(Notify::new());
        lock(&self.fallbacks).insert(app, Arc::clone(&fallback));
        let spliced = Spliced {
            splicer: Arc::clone(self),
            app,
            up: up_cookie,
            fallback,
        };
        // The read counter exists before anything is redirected. It counts every byte
        // the app reads, so it starts below zero by what reaches the app another way.
        lock(&self.read)
            .insert(app, 0u64.wrapping_sub(sent_after), BPF_NOEXIST)
            .map_err(map_err(MAP_SPLICE_READ))?;
        lock(&self.up)
            .insert(up_cookie, up.as_raw_fd(), BPF_NOEXIST)
            .map_err(map_err(MAP_SPLICE_UP))?;
        let mut entries = lock(&self.entries);
        // Upstream -> app first: the server sends nothing before the app's next request,
        // which only the second entry lets through.
        entries
            .insert(
                up_cookie,
                SpliceValue {
                    peer: app,
                    flags: SPLICE_INGRESS,
                    app_cookie: app,
                    ..SpliceValue::default()
                },
                BPF_NOEXIST,
            )
            .map_err(map_err(MAP_SPLICE))?;
        // Until the upstream's first packet tells the kernel where its socket is, the
        // app's sends are bounded by the room its send buffer has now.
        let blind_budget = socket2::SockRef::from(up)
            .send_buffer_size()
            .map_or(0, |b| b as u64 / 2);
        entries
            .insert(
                app,
                SpliceValue {
                    peer: up_cookie,
                    blind_budget,
                    flags: match upload {
                        UploadPath::Kernel => 0,
                        UploadPath::KernelMysql => SPLICE_MYSQL,
                        // The app's sends take the normal path to the daemon from the start.
                        UploadPath::Daemon => SPLICE_FALLBACK,
                    },
                    ..SpliceValue::default()
                },
                BPF_NOEXIST,
            )
            .map_err(map_err(MAP_SPLICE))?;
        drop(entries);
        Ok(spliced)
    }

    fn bytes(&self, cookie: u64) -> u64 {
        lock(&self.entries).get(&cookie, 0).map_or(0, |v| v.bytes)
    }

    /// Take the app socket with cookie `app`, which will not be spliced (TLS upstream,
    /// auth failure, cancel request...), out of `SPLICE_APP`: it goes back to plain TCP,
    /// without the sk_msg program on every send.
    pub fn forget(&self, app: u64) {
        let _ = lock(&self.app).remove(&app);
    }
}

/// Who carries a spliced session's upload (app -> upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadPath {
    /// The kernel, byte for byte.
    Kernel,
    /// The kernel, framing MySQL packets; the daemon from the first `COM_CHANGE_USER`.
    KernelMysql,
    /// The daemon (the kernel carries the download only).
    Daemon,
}

/// A spliced session; dropping it removes its map entries (the sockets leave the
/// sockhashes by themselves when they close).
#[derive(Debug)]
pub struct Spliced {
    splicer: Arc<Splicer>,
    /// The app socket's cookie.
    app: u64,
    /// The upstream socket's cookie.
    up: u64,
    fallback: Arc<Notify>,
}

/// A spliced session's kernel byte counts, readable from elsewhere (`broker status`)
/// while the session runs (zero once its entries are gone).
#[derive(Debug, Clone)]
pub struct SpliceCounts {
    splicer: std::sync::Weak<Splicer>,
    app: u64,
    up: u64,
}

impl SpliceCounts {
    /// (app -> upstream, upstream -> app) moved by the kernel so far.
    #[must_use]
    pub fn bytes(&self) -> (u64, u64) {
        self.splicer
            .upgrade()
            .map_or((0, 0), |s| (s.bytes(self.app), s.bytes(self.up)))
    }
}

impl Spliced {
    /// A handle on this session's kernel byte counts.
    #[must_use]
    pub fn counts(&self) -> SpliceCounts {
        SpliceCounts {
            splicer: Arc::downgrade(&self.splicer),
            app: self.app,
            up: self.up,
        }
    }

    /// Bytes the kernel moved so far: (app -> upstream, upstream -> app). Read them
    /// before [`Spliced::unlink`].
    #[must_use]
    pub fn bytes(&self) -> (u64, u64) {
        (self.splicer.bytes(self.app), self.splicer.bytes(self.up))
    }

    /// Stop the kernel path both ways (delete the two `SPLICE` entries); idempotent.
    /// Called as soon as the app has closed, so that nothing more is redirected.
    pub fn unlink(&self) {
        let mut entries = lock(&self.splicer.entries);
        let _ = entries.remove(&self.app);
        let _ = entries.remove(&self.up);
    }

    /// Wait until the kernel has given the server -> app direction back to the daemon:
    /// the app fell [`broker_common::SPLICE_READ_BUDGET`] bytes behind.
    pub async fn read_fallback(&self) {
        self.fallback.notified().await;
    }

    /// Bytes of the current protocol message the app had still to send when the kernel
    /// handed the upload back (the daemon's upload filter resumes from there): 0 but
    /// for [`UploadPath::KernelMysql`].
    #[must_use]
    pub fn upload_left(&self) -> u32 {
        lock(&self.splicer.entries)
            .get(&self.app, 0)
            .map_or(0, |v| v.msg_left)
    }

    /// Whether the kernel has given the server -> app direction back (also true once
    /// [`Spliced::read_fallback`] has returned).
    #[must_use]
    pub fn download_fell_back(&self) -> bool {
        lock(&self.splicer.entries)
            .get(&self.up, 0)
            .is_ok_and(|v| v.flags & SPLICE_FALLBACK != 0)
    }

    /// Whether the app has read everything the kernel redirected to it, so that bytes
    /// the daemon now writes to it come after them.
    #[must_use]
    pub fn app_caught_up(&self) -> bool {
        self.unread().is_some_and(|n| n <= 0)
    }

    /// Bytes the kernel redirected to the app that it has not read yet (below zero while
    /// bytes the daemon wrote to it are unread); `None` if the read counter is gone.
    /// Meaningful before [`Spliced::unlink`].
    #[must_use]
    pub fn unread(&self) -> Option<i64> {
        let read = lock(&self.splicer.read).get(&self.app, 0).ok()?;
        // Wrapping: the counter starts below zero (see Splicer::start).
        Some(self.splicer.bytes(self.up).wrapping_sub(read).cast_signed())
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        self.unlink();
        lock(&self.splicer.fallbacks).remove(&self.app);
        let _ = lock(&self.splicer.read).remove(&self.app);
        let _ = lock(&self.splicer.up).remove(&self.up);
    }
}

/// The `TARGET_PORTS` entries (the non-zero ones) naming the ports of `targets`.
fn port_bits<'a>(targets: impl Iterator<Item = &'a KernelTarget>) -> BTreeMap<u32, PortBits> {
    let mut out: BTreeMap<u32, PortBits> = BTreeMap::new();
    for t in targets {
        let (port, cidr) = match *t {
            KernelTarget::Exact(_, port) => (port, false),
            KernelTarget::Cidr(_, _, port) => (port, true),
        };
        let (slot, bit) = port_slot(port);
        let e = out.entry(slot).or_default();
        if cidr {
            e.cidr |= bit;
        } else {
            e.exact |= bit;
        }
    }
    out
}

fn exact_key(ip: IpAddr, port: u16) -> AddrKey {
    AddrKey {
        addr: addr16(ip),
        port,
        _pad: 0,
    }
}

fn cidr_key(ip: IpAddr, len: u8, port: u16) -> Key<CidrKey> {
    // IPv4 prefixes live under ::ffff:0:0/96 in the trie.
    let addr_bits = match ip {
        IpAddr::V4(_) => 96 + u32::from(len),
        IpAddr::V6(_) => u32::from(len),
    };
    Key::new(
        16 + addr_bits,
        CidrKey {
            port_be: port.to_be_bytes(),
            addr: addr16(ip),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_keys_are_the_app_sockets_view_and_normalise_ipv4_mapped() {
        let listener: SocketAddr = "127.0.0.1:5999".parse().unwrap();
        let a = conn_key(7, "127.0.0.1:4000".parse().unwrap(), listener);
        let b = conn_key(
            7,
            "[::ffff:127.0.0.1]:4000".parse().unwrap(),
            "[::ffff:127.0.0.1]:5999".parse().unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.netns_cookie, 7);
        assert_eq!(a.sock.local[10..], [0xff, 0xff, 127, 0, 0, 1]);
        assert_eq!((a.sock.local_port, a.sock.remote_port), (4000, 5999));
        assert_ne!(a, conn_key(8, "127.0.0.1:4000".parse().unwrap(), listener));
    }

    #[test]
    fn cidr_prefix_lengths_cover_the_port() {
        let k = cidr_key("10.1.0.0".parse().unwrap(), 16, 5432);
        let (len, data) = (k.prefix_len(), k.data());
        assert_eq!(len, 16 + 96 + 16);
        assert_eq!(data.port_be, 5432u16.to_be_bytes());
        let k6 = cidr_key("2001:db8::".parse().unwrap(), 32, 443);
        assert_eq!(k6.prefix_len(), 16 + 32);
    }

    #[test]
    fn port_bits_name_each_port_once_by_kind() {
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        let targets = [
            KernelTarget::Exact(v4("10.0.0.1"), 5432),
            KernelTarget::Exact(v4("10.0.0.2"), 5432),
            KernelTarget::Cidr(v4("10.1.0.0"), 16, 5432),
            KernelTarget::Cidr(v4("2001:db8::"), 32, 443),
            KernelTarget::Exact(v4("::1"), 65535),
        ];
        let bits = port_bits(targets.iter());
        assert_eq!(bits.len(), 3);
        assert_eq!(
            bits[&84],
            PortBits {
                exact: 1 << 56,
                cidr: 1 << 56
            }
        );
        assert_eq!(
            bits[&6],
            PortBits {
                exact: 0,
                cidr: 1 << 59
            }
        );
        assert_eq!(
            bits[&1023],
            PortBits {
                exact: 1 << 63,
                cidr: 0
            }
        );
        assert!(port_bits([].iter()).is_empty());
    }

    #[test]
    fn record_destination_round_trips() {
        let rec = ConnRecord {
            cgroup_id: 1,
            connect_ns: 0,
            cookie: 7,
            netns_cookie: 1,
            orig_addr: mapped_v4([10, 1, 2, 3]),
            comm: [0; 16],
            orig_port: 80,
            family: broker_common::FAMILY_INET,
            service_id: 0,
            pid: 1,
            uid: 0,
            gid: 0,
            flags: 0,
            generation: 1,
            _pad: 0,
        };
        assert_eq!(record_destination(&rec), "10.1.2.3:80".parse().unwrap());
    }
}
