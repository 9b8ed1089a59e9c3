//! What the kernel programs need from the process, checked before anything is loaded,
//! so that a daemon started without it fails once, saying which capability is missing,
//! instead of with the kernel's `EPERM` from the first map or a verifier log.
//!
//! Measured on 6.x (`setpriv --bounding-set`): creating the maps needs `CAP_BPF` (the
//! sockhashes `CAP_NET_ADMIN`); loading the cgroup, sock_ops, sk_msg and sk_skb
//! programs needs `CAP_BPF` + `CAP_NET_ADMIN`; the raw tracepoint and the kernel-memory
//! reads of the splice programs need `CAP_PERFMON`. `CAP_SYS_ADMIN` stands in for each
//! of the three. `broker exec` also creates a child cgroup under the cgroup v2 root,
//! which needs write access to it (root).

/// Capability numbers (`linux/capability.h`).
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The process's effective user id and capability set, from `/proc/self/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Privileges {
    pub euid: u32,
    pub effective: u64,
}

impl Privileges {
    /// This process's (`None` if `/proc/self/status` cannot be read or parsed).
    #[must_use]
    pub fn current() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/self/status").ok()?)
    }

    fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let euid = field("Uid:")?.split_whitespace().nth(1)?.parse().ok()?;
        let effective = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
        Some(Self { euid, effective })
    }

    fn has(self, cap: u32) -> bool {
        self.effective & (1u64 << cap) != 0
    }

    /// The capabilities loading and attaching the programs needs that this set lacks.
    #[must_use]
    pub fn missing_for_ebpf(self) -> Vec<&'static str> {
        let admin = self.has(CAP_SYS_ADMIN);
        let mut v = Vec::new();
        for (cap, name) in [
            (CAP_BPF, "CAP_BPF"),
            (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
            (CAP_PERFMON, "CAP_PERFMON"),
        ] {
            if !admin && !self.has(cap) {
                v.push(name);
            }
        }
        v
    }
}

/// The kernel programs cannot be loaded with this process's capabilities.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} loads eBPF programs, which needs {needs}; this process (uid {euid}) lacks {missing}. Run it as root, or grant them (systemd: AmbientCapabilities={ambient}; a file: setcap {setcap}+ep){hint}"
)]
pub struct MissingCapabilities {
    pub what: &'static str,
    pub euid: u32,
    pub needs: &'static str,
    pub missing: String,
    pub ambient: &'static str,
    pub setcap: &'static str,
    pub hint: String,
}

/// Fail early if the programs cannot be loaded. `what` names the command; `hint` is
/// appended (such as how to run without eBPF). Unknown privileges are not an error
/// (the kernel decides, and its error is reported).
///
/// # Errors
/// [`MissingCapabilities`] naming what is missing.
pub fn check_ebpf(what: &'static str, hint: &str) -> Result<(), MissingCapabilities> {
    let Some(p) = Privileges::current() else {
        return Ok(());
    };
    check_ebpf_with(p, what, hint)
}

fn check_ebpf_with(
    p: Privileges,
    what: &'static str,
    hint: &str,
) -> Result<(), MissingCapabilities> {
    let missing = p.missing_for_ebpf();
    if missing.is_empty() {
        return Ok(());
    }
    Err(MissingCapabilities {
        what,
        euid: p.euid,
        needs: "CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN)",
        missing: missing.join(", "),
        ambient: "CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        setcap: "cap_bpf,cap_net_admin,cap_perfmon",
        hint: hint.to_owned(),
    })
}

/// `anyhow`'s `{:#}` without the repetitions: a cause whose text the previous part
/// already shows (libraries that print their source inside their own message, then
/// report it as the source too) is left out, so each cause is stated once.
#[must_use]
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if parts.last().is_some_and(|last| last.contains(&text)) {
            continue;
        }
        parts.push(text);
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOBODY: &str = "Name:\tbroker\nUid:\t65534\t65534\t65534\t65534\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n";
    const ROOT: &str = "Uid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\n";

    #[test]
    fn parses_status() {
        assert_eq!(
            Privileges::parse(NOBODY),
            Some(Privileges {
                euid: 65534,
                effective: 0
            })
        );
        let root = Privileges::parse(ROOT).unwrap();
        assert_eq!(root.euid, 0);
        assert!(root.missing_for_ebpf().is_empty());
        assert_eq!(Privileges::parse("garbage"), None);
    }

    #[test]
    fn names_what_is_missing() {
        let nobody = Privileges::parse(NOBODY).unwrap();
        assert_eq!(
            nobody.missing_for_ebpf(),
            ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
        );
        let bpf_net = Privileges {
            euid: 0,
            effective: (1 << CAP_BPF) | (1 << CAP_NET_ADMIN),
        };
        assert_eq!(bpf_net.missing_for_ebpf(), ["CAP_PERFMON"]);
        let sys_admin = Privileges {
            euid: 1000,
            effective: 1 << CAP_SYS_ADMIN,
        };
        assert!(sys_admin.missing_for_ebpf().is_empty());
        let e = check_ebpf_with(nobody, "broker run", "; hint")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("broker run loads eBPF programs")
                && e.contains("(uid 65534) lacks CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON")
                && e.ends_with("; hint"),
            "{e}"
        );
    }

    #[test]
    fn chain_states_each_cause_once() {
        // A library that prints its source in its own message and reports it as the
        // source too (aya's map errors, our cgroup errors).
        let e = anyhow::anyhow!("Permission denied (os error 13)")
            .context("creating cgroup /x: Permission denied (os error 13)")
            .context("set-up");
        assert_eq!(
            error_chain(&e),
            "set-up: creating cgroup /x: Permission denied (os error 13)"
        );
        let e = anyhow::anyhow!("b").context("a");
        assert_eq!(error_chain(&e), "a: b");
    }
}
