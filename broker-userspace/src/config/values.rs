//! Parsers for the small value syntaxes of the config: listen addresses, intercept
//! targets, durations, the health address.
//!
//! They return the reason only; the caller decides whether the value itself may be
//! shown (it may have come from the environment).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;

use super::model::{InterceptTarget, ListenAddr};

/// `tcp://HOST:PORT` (HOST an IP address, `[v6]`, or `localhost`) or `unix:///PATH`.
pub(super) fn listen_addr(s: &str) -> Result<ListenAddr, String> {
    if let Some(rest) = s.strip_prefix("tcp://") {
        let (host, port) = split_host_port(rest)?;
        let port = port_number(port, true)?;
        let ip = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            let h = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            IpAddr::from_str(h)
                .map_err(|_| "the host must be an IP address or \"localhost\"".to_owned())?
        };
        Ok(ListenAddr::Tcp(SocketAddr::new(ip, port)))
    } else if let Some(path) = s.strip_prefix("unix://") {
        if !path.starts_with('/') || path.len() < 2 {
            return Err("a unix socket path must be absolute: unix:///path/to/socket".into());
        }
        Ok(ListenAddr::Unix(PathBuf::from(path)))
    } else {
        Err("must be tcp://HOST:PORT or unix:///PATH".into())
    }
}

/// Split `host:port` / `[v6]:port`; the host keeps its brackets.
fn split_host_port(s: &str) -> Result<(&str, &str), String> {
    if s.starts_with('[') {
        let end = s
            .find(']')
            .ok_or_else(|| "unclosed \"[\" in the address".to_owned())?;
        let port = s[end + 1..]
            .strip_prefix(':')
            .ok_or_else(|| "missing \":PORT\"".to_owned())?;
        Ok((&s[..=end], port))
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| "missing \":PORT\"".to_owned())?;
        if host.contains(':') {
            return Err("an IPv6 address must be in brackets: [2001:db8::1]:443".into());
        }
        if host.is_empty() {
            return Err("missing host before \":PORT\"".into());
        }
        Ok((host, port))
    }
}

fn port_number(s: &str, zero_ok: bool) -> Result<u16, String> {
    if s.is_empty() {
        return Err("missing port after \":\"".into());
    }
    match s.parse::<u16>() {
        Ok(0) if !zero_ok => Err("port 0 is not a valid destination port".into()),
        Ok(p) if s.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err("the port must be a number from 1 to 65535".into()),
    }
}

/// `host:port`, `ip:port`, `[v6]:port`, `cidr:port`, `[v6cidr]:port`.
pub(super) fn intercept_target(s: &str) -> Result<InterceptTarget, String> {
    let (host, port) = split_host_port(s)?;
    let port = port_number(port, false)?;
    let bracketed = host.starts_with('[');
    let inner = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if inner.contains('/') {
        let net = IpNet::from_str(inner).map_err(|_| {
            "invalid CIDR: expected ADDRESS/PREFIX such as 10.0.0.0/24 or [2001:db8::/64]"
                .to_owned()
        })?;
        if matches!(net, IpNet::V6(_)) && !bracketed {
            return Err("an IPv6 CIDR must be in brackets: [2001:db8::/64]:443".into());
        }
        return Ok(InterceptTarget::Cidr {
            net: net.trunc(),
            port,
        });
    }
    if let Ok(ip) = IpAddr::from_str(inner) {
        return Ok(InterceptTarget::Addr(SocketAddr::new(ip, port)));
    }
    if bracketed {
        return Err("invalid IPv6 address in brackets".into());
    }
    if !valid_dns_name(inner) {
        return Err(
            "not a valid host name, IP address or CIDR (host names are letters, digits, \"-\" and \".\")"
                .into(),
        );
    }
    Ok(InterceptTarget::Host {
        host: inner.trim_end_matches('.').to_ascii_lowercase(),
        port,
    })
}

fn valid_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // A name made only of digits and dots is a malformed IPv4 address.
        && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// A duration: one or more `<integer><unit>` with unit `ms`, `s`, `m` or `h`
/// (`500ms`, `10s`, `1m30s`); `0` alone is zero.
pub(super) fn duration(s: &str) -> Result<Duration, String> {
    const HELP: &str = "expected a duration such as 500ms, 10s, 5m or 1m30s";
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(HELP.into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(HELP.into());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| HELP.to_owned())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(|| HELP.to_owned())?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(|| HELP.to_owned())?),
            "" => return Err(format!("missing unit (ms, s, m or h); {HELP}")),
            _ => return Err(format!("unknown unit (use ms, s, m or h); {HELP}")),
        };
        rest = &rest[unit_len..];
        total = total.checked_add(part).ok_or_else(|| HELP.to_owned())?;
    }
    Ok(total)
}

/// `IP:PORT` (or `localhost:PORT`), or `off`.
pub(super) fn health_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("false") {
        return Ok(None);
    }
    match listen_addr(&format!("tcp://{s}")) {
        Ok(ListenAddr::Tcp(a)) => Ok(Some(a)),
        _ => Err("expected IP:PORT (such as 127.0.0.1:5335) or \"off\"".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addrs() {
        assert_eq!(
            listen_addr("tcp://127.0.0.1:5432").unwrap(),
            ListenAddr::Tcp("127.0.0.1:5432".parse().unwrap())
        );
        assert_eq!(
            listen_addr("tcp://localhost:8081").unwrap(),
            ListenAddr::Tcp("127.0.0.1:8081".parse().unwrap())
        );
        assert_eq!(
            listen_addr("tcp://[::1]:5432").unwrap(),
            ListenAddr::Tcp("[::1]:5432".parse().unwrap())
        );
        assert_eq!(
            listen_addr("tcp://0.0.0.0:0").unwrap(),
            ListenAddr::Tcp("0.0.0.0:0".parse().unwrap())
        );
        assert_eq!(
            listen_addr("unix:///sock/.s.PGSQL.5432").unwrap(),
            ListenAddr::Unix("/sock/.s.PGSQL.5432".into())
        );
        for bad in [
            "127.0.0.1:5432",
            "tcp://db.example.com:5432",
            "tcp://127.0.0.1",
            "tcp://127.0.0.1:",
            "tcp://127.0.0.1:70000",
            "tcp://::1:5432",
            "unix://relative/path",
            "unix://",
            "http://127.0.0.1:80",
        ] {
            assert!(listen_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn intercept_targets() {
        assert_eq!(
            intercept_target("DB.example.com:5432").unwrap(),
            InterceptTarget::Host {
                host: "db.example.com".into(),
                port: 5432
            }
        );
        assert_eq!(
            intercept_target("10.0.0.5:5432").unwrap(),
            InterceptTarget::Addr("10.0.0.5:5432".parse().unwrap())
        );
        assert_eq!(
            intercept_target("[2001:db8::5]:5432").unwrap(),
            InterceptTarget::Addr("[2001:db8::5]:5432".parse().unwrap())
        );
        assert_eq!(
            intercept_target("10.0.0.0/24:5432").unwrap(),
            InterceptTarget::Cidr {
                net: "10.0.0.0/24".parse().unwrap(),
                port: 5432
            }
        );
        assert_eq!(
            intercept_target("10.0.0.7/24:5432").unwrap(),
            InterceptTarget::Cidr {
                net: "10.0.0.0/24".parse().unwrap(),
                port: 5432
            }
        );
        assert_eq!(
            intercept_target("[2001:db8::/64]:443").unwrap(),
            InterceptTarget::Cidr {
                net: "2001:db8::/64".parse().unwrap(),
                port: 443
            }
        );
        for bad in [
            "db.example.com",
            "db.example.com:",
            "db.example.com:0",
            "db.example.com:99999",
            "10.0.0.0/33:5432",
            "10.0.0.0/:5432",
            "300.1.2.3:5432",
            "2001:db8::5:5432",
            "[2001:db8::5:5432",
            "[nothost]:5432",
            "bad_host!:5432",
            "-x.com:1",
            ":5432",
        ] {
            assert!(intercept_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(duration("0").unwrap(), Duration::ZERO);
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "10", "s", "10 s", "10sec", "-1s", "1.5s", "10d"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn health() {
        assert_eq!(health_addr("off").unwrap(), None);
        assert_eq!(
            health_addr("127.0.0.1:5335").unwrap(),
            Some("127.0.0.1:5335".parse().unwrap())
        );
        assert_eq!(
            health_addr("[::1]:9000").unwrap(),
            Some("[::1]:9000".parse().unwrap())
        );
        assert!(health_addr("5335").is_err());
        assert!(health_addr("example.com:5335").is_err());
    }
}
