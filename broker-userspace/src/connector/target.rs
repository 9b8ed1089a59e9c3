//! Where a connector's upstream is, worked out the same way for every connector: the
//! `host` and `port` credentials, else what the connector's own settings say (e.g. a
//! Secretless `address`), else the app's original destination where the service allows
//! it, else the connector's default port.

use std::net::SocketAddr;

use ipnet::IpNet;

use crate::{
    config::InterceptTarget,
    connector::dial::HostPort,
    connector::{ConnError, Credentials},
};

/// Whether the app's own destination may serve as the upstream when no credential names
/// one.
#[derive(Debug, Clone, Copy)]
pub enum Destinations<'a> {
    /// Any (exact intercept targets: the destination is one the operator listed).
    Any,
    /// Only inside these blocks (e.g. PostgreSQL's `upstreamAllow`).
    Within(&'a [IpNet]),
    /// Never: a CIDR intercept without an allow list (config load requires an explicit
    /// upstream then; this holds when such a credential turns out empty).
    Never,
}

impl<'a> Destinations<'a> {
    /// The rule for a service intercepting `intercept`, with `allow` as its allow list
    /// (empty: none). Without a list, a CIDR target never lets the app choose.
    #[must_use]
    pub fn for_service(allow: &'a [IpNet], intercept: &[InterceptTarget]) -> Self {
        if !allow.is_empty() {
            Self::Within(allow)
        } else if intercept
            .iter()
            .any(|t| matches!(t, InterceptTarget::Cidr { .. }))
        {
            Self::Never
        } else {
            Self::Any
        }
    }

    fn check(self, dst: SocketAddr) -> Result<(), ConnError> {
        let ip = dst.ip().to_canonical();
        match self {
            Self::Any => Ok(()),
            Self::Within(nets) if nets.iter().any(|n| n.contains(&ip)) => Ok(()),
            Self::Within(_) => Err(ConnError::Config(format!(
                "the app's destination {dst} is not in `upstreamAllow`: the broker does not \
                 log in there"
            ))),
            Self::Never => Err(ConnError::Config(
                "no upstream: credential `host` is empty, and a CIDR intercept without \
                 `upstreamAllow` does not let the app's destination be used"
                    .into(),
            )),
        }
    }
}

/// What a connector knows besides the `host`/`port` credentials.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fallbacks<'a> {
    /// Host and port from another credential (Secretless' `address`), preferred over
    /// the app's destination.
    pub host: Option<&'a str>,
    pub port: Option<u16>,
    /// The port when nothing else names one (PostgreSQL: 5432; a `listenOn` service:
    /// its listener's port).
    pub default_port: Option<u16>,
}

/// Where the app meant to go, as the core saw it.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppDestination<'a> {
    /// The original destination (transparent connections).
    pub addr: Option<SocketAddr>,
    /// The `intercept:` hostname that address stands for, if any.
    pub host: Option<&'a str>,
}

/// The upstream, and the name its TLS certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub to: HostPort,
    /// The host as named: the credential or fallback host, or, when the app's
    /// destination is the upstream, the `intercept:` hostname the app dialled (its
    /// address when it dialled an address). The connection goes to `to`; a certificate
    /// is checked against this (unless a connector setting names another).
    pub name: String,
}

/// The upstream: host = credential `host` (trimmed, when not empty), else
/// `fallbacks.host`, else the app's original destination (when `dests` allows it);
/// port = credential `port`, else `fallbacks.port`, else the original destination's,
/// else `fallbacks.default_port`.
///
/// # Errors
/// `ConnError::Config` when no upstream can be determined or `port` is not a port
/// number; never quotes a credential value.
pub fn resolve(
    creds: &Credentials,
    app: AppDestination<'_>,
    fallbacks: Fallbacks<'_>,
    dests: Destinations<'_>,
) -> Result<Target, ConnError> {
    let orig_dst = app.addr;
    let mut name = None;
    let host = match creds.text("host")?.map(str::trim) {
        Some(h) if !h.is_empty() => h.to_owned(),
        _ => match (fallbacks.host, orig_dst) {
            (Some(h), _) => h.to_owned(),
            (None, Some(a)) => {
                dests.check(a)?;
                name = app.host.map(str::to_owned);
                a.ip().to_canonical().to_string()
            }
            (None, None) => {
                return Err(ConnError::Config(
                    "no upstream host: set credential `host`".into(),
                ));
            }
        },
    };
    let port = match creds.text("port")?.map(str::trim) {
        Some(p) if !p.is_empty() => parse_port(p)?,
        _ => fallbacks
            .port
            .or(orig_dst.map(|a| a.port()))
            .or(fallbacks.default_port)
            .ok_or_else(|| ConnError::Config("no upstream port: set credential `port`".into()))?,
    };
    Ok(Target {
        name: name.unwrap_or_else(|| host.clone()),
        to: HostPort::new(host, port),
    })
}

/// A port credential: 1 to 65535.
///
/// # Errors
/// `ConnError::Config` naming the credential, not its value.
pub fn parse_port(p: &str) -> Result<u16, ConnError> {
    p.parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| ConnError::Config("credential `port` is not a port number".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn creds(pairs: &[(&str, &str)]) -> Credentials {
        let mut c = Credentials::default();
        for (k, v) in pairs {
            c.0.insert((*k).to_owned(), Secret::from_str_value(v));
        }
        c
    }

    #[test]
    fn credentials_then_fallbacks_then_destination_then_default() {
        let dst: SocketAddr = "[::ffff:10.0.0.5]:6432".parse().unwrap();
        let any = Destinations::Any;
        let none = Fallbacks::default();
        let r = |c: &[(&str, &str)], d, f| {
            let app = AppDestination {
                addr: d,
                host: None,
            };
            resolve(&creds(c), app, f, any).map(|t| t.to.to_string())
        };
        assert_eq!(r(&[], Some(dst), none).unwrap(), "10.0.0.5:6432");
        assert_eq!(r(&[("host", " db ")], Some(dst), none).unwrap(), "db:6432");
        assert_eq!(
            r(&[("host", "")], Some(dst), none).unwrap(),
            "10.0.0.5:6432"
        );
        let fb = Fallbacks {
            host: Some("addr-host"),
            port: Some(7000),
            default_port: Some(5432),
        };
        assert_eq!(r(&[], Some(dst), fb).unwrap(), "addr-host:7000");
        assert_eq!(r(&[("port", "1")], Some(dst), fb).unwrap(), "addr-host:1");
        let dflt = Fallbacks {
            default_port: Some(5432),
            ..none
        };
        assert_eq!(r(&[("host", "::1")], None, dflt).unwrap(), "[::1]:5432");
        assert!(r(&[("host", "db")], None, none).is_err());
        assert!(r(&[], None, dflt).is_err());
        for bad in ["0", "x", "70000", "-1"] {
            let e = r(&[("host", "h"), ("port", bad)], None, none).unwrap_err();
            assert!(!e.to_string().contains(bad), "{e}");
        }
    }

    /// The certificate name: the host as named, or the hostname the app dialled when
    /// its destination is the upstream.
    #[test]
    fn the_name_to_verify() {
        let dst: SocketAddr = "10.0.0.5:5432".parse().unwrap();
        let app = AppDestination {
            addr: Some(dst),
            host: Some("db.example.com"),
        };
        let fb = Fallbacks::default();
        let any = Destinations::Any;
        let t = resolve(&creds(&[]), app, fb, any).unwrap();
        assert_eq!(
            (t.to.to_string(), t.name.as_str()),
            ("10.0.0.5:5432".into(), "db.example.com")
        );
        let t = resolve(&creds(&[("host", "pg.internal")]), app, fb, any).unwrap();
        assert_eq!(
            (t.to.to_string(), t.name.as_str()),
            ("pg.internal:5432".into(), "pg.internal")
        );
        let by_addr = AppDestination { host: None, ..app };
        let t = resolve(&creds(&[]), by_addr, fb, any).unwrap();
        assert_eq!(t.name, "10.0.0.5");
    }
}
