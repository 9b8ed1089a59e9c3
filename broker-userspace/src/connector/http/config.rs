//! The HTTP kinds' syntax: `generic_http` (alias `http`), `basic_auth`, `conjur` and
//! `aws`, with Secretless' `config:` keys (`headers`, `queryParams`,
//! `authenticateURLsMatching`, `forceSSL`, `credentialValidations`) and ours (`upstream`,
//! `keepClientAuthorization`, `caFile`, `timeout`).

use std::{path::PathBuf, sync::Arc, time::Duration};

use yaml_serde::Value;

use super::inject::Tmpl;
use crate::config::{AuthMethod, ConnectorBlock, ConnectorSettings, Loader, join};

/// How a service authenticates its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `generic_http`: the `headers` and `queryParams` templates (`conjur`: one fixed
    /// header template).
    Generic,
    /// `basic_auth`: `Authorization: Basic base64(username:password)`.
    Basic,
    /// `aws`: each request re-signed with AWS Signature Version 4 ([`super::sigv4`]).
    Aws,
}

/// Where a reverse-proxy service sends its requests (`upstream: https://api.example.com`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Prepended to every request path (`/` or empty: none).
    pub base_path: String,
}

impl Upstream {
    /// The `Host` header value: the port only when not the scheme's default.
    #[must_use]
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// A service's parsed HTTP settings.
#[derive(Debug)]
pub struct HttpSettings {
    pub style: Style,
    /// Header name -> value template, in file order.
    pub headers: Vec<(http::HeaderName, Tmpl)>,
    /// Query parameter -> value template, in file order.
    pub query_params: Vec<(String, Tmpl)>,
    /// Secretless' `oauth1:` block: `consumer_key`, `consumer_secret`, `token`,
    /// `token_secret` templates; each request is signed (RFC 5849, HMAC-SHA1).
    pub oauth1: Option<Vec<(String, Tmpl)>>,
    /// Requests whose URL matches one of these are authenticated (empty: all).
    pub url_patterns: Vec<regex::Regex>,
    /// Credential -> regex its value must match (Secretless `credentialValidations`).
    pub credential_validations: Vec<(String, regex::Regex)>,
    pub force_ssl: bool,
    pub upstream: Option<Upstream>,
    /// Pass the client's own `Authorization` header (default: removed from
    /// authenticated requests).
    pub keep_client_authorization: bool,
    /// Extra CA certificates (PEM) trusted for the upstream besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// How long the upstream may take to answer a request (its response head).
    pub timeout: Duration,
}

impl ConnectorSettings for HttpSettings {}

/// Default for `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

const GENERIC_KEYS: &[&str] = &[
    "headers",
    "queryParams",
    "oauth1",
    "authenticateURLsMatching",
    "forceSSL",
    "credentialValidations",
    "upstream",
    "keepClientAuthorization",
    "caFile",
    "timeout",
];
const AWS_KEYS: &[&str] = &[
    "authenticateURLsMatching",
    "forceSSL",
    "upstream",
    "caFile",
    "timeout",
];
const BASIC_KEYS: &[&str] = &[
    "authenticateURLsMatching",
    "forceSSL",
    "upstream",
    "keepClientAuthorization",
    "caFile",
    "timeout",
];

/// `conjur` takes `basic_auth`'s keys: its header is fixed.
const CONJUR_KEYS: &[&str] = BASIC_KEYS;

/// The header Secretless' `conjur` connector sets: the Conjur access token (the JSON
/// document Conjur's `authenticate` returns), base64-encoded.
pub const CONJUR_HEADER: &str = r#"Token token="{{ .accessToken | base64 }}""#;

pub fn parse_generic(
    l: &mut Loader<'_>,
    b: &ConnectorBlock<'_>,
) -> Option<Arc<dyn ConnectorSettings>> {
    parse(l, b, Style::Generic, GENERIC_KEYS, None)
}

pub fn parse_basic(
    l: &mut Loader<'_>,
    b: &ConnectorBlock<'_>,
) -> Option<Arc<dyn ConnectorSettings>> {
    parse(l, b, Style::Basic, BASIC_KEYS, None)
}

/// `conjur`: a generic service whose only header is [`CONJUR_HEADER`].
pub fn parse_conjur(
    l: &mut Loader<'_>,
    b: &ConnectorBlock<'_>,
) -> Option<Arc<dyn ConnectorSettings>> {
    let preset = (http::header::AUTHORIZATION, CONJUR_HEADER);
    parse(l, b, Style::Generic, CONJUR_KEYS, Some(preset))
}

pub fn parse_aws(l: &mut Loader<'_>, b: &ConnectorBlock<'_>) -> Option<Arc<dyn ConnectorSettings>> {
    parse(l, b, Style::Aws, AWS_KEYS, None)
}

/// Credentials a template may name besides the service's own.
const IMPLICIT: &[&str] = &["access_token"];

/// The `config:` block of an HTTP kind: `keys` are the ones it accepts; `preset`, a header
/// the kind always sets (its template's credentials are the kind's required ones, which
/// the loader checks).
fn parse(
    l: &mut Loader<'_>,
    b: &ConnectorBlock<'_>,
    style: Style,
    keys: &[&str],
    preset: Option<(http::HeaderName, &str)>,
) -> Option<Arc<dyn ConnectorSettings>> {
    let path = b.path;
    let before = l.error_count();
    let empty = yaml_serde::Mapping::new();
    let m = match b.value {
        None => &empty,
        Some(v) => l.map(path, v, "a map")?,
    };
    l.keys(path, m, keys);
    let mut s = HttpSettings {
        style,
        headers: Vec::new(),
        query_params: Vec::new(),
        oauth1: None,
        url_patterns: Vec::new(),
        credential_validations: Vec::new(),
        force_ssl: false,
        upstream: None,
        keep_client_authorization: false,
        ca_file: None,
        timeout: DEFAULT_TIMEOUT,
    };
    let templates = |l: &mut Loader<'_>, key: &str| -> Vec<(String, Tmpl)> {
        let kpath = join(path, key);
        let Some(v) = m.get(key) else {
            return Vec::new();
        };
        let Some(tm) = l.map(&kpath, v, "a map of name: template") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in tm {
            let Some(name) = k.as_str() else {
                l.err(&kpath, "keys must be strings");
                continue;
            };
            let p = join(&kpath, name);
            let Some(src) = l.text(&p, v) else { continue };
            match Tmpl::parse(&src) {
                Ok(t) => {
                    for n in t.names() {
                        if !b.credentials.contains(n) && !IMPLICIT.contains(&n) {
                            l.err(
                                &p,
                                format!(
                                    "the template names credential \"{n}\", which the service \
                                     does not give"
                                ),
                            );
                        }
                    }
                    out.push((name.to_owned(), t));
                }
                Err(e) => l.err(&p, format!("invalid template: {e}")),
            }
        }
        out
    };
    for (name, t) in templates(l, "headers") {
        match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => s.headers.push((h, t)),
            Err(_) => l.err(
                &join(&join(path, "headers"), &name),
                "not a valid HTTP header name",
            ),
        }
    }
    if let Some((name, src)) = preset {
        s.headers
            .push((name, Tmpl::parse(src).expect("fixed template")));
    }
    s.query_params = templates(l, "queryParams");
    if m.contains_key("oauth1") {
        let o = templates(l, "oauth1");
        let p = join(path, "oauth1");
        for (k, _) in &o {
            if !super::oauth1::KEYS.contains(&k.as_str()) {
                l.err(
                    &join(&p, k),
                    format!("unknown key (known: {})", super::oauth1::KEYS.join(", ")),
                );
            }
        }
        for k in super::oauth1::KEYS {
            if !o.iter().any(|(n, _)| n == k) {
                l.err(&p, format!("missing \"{k}\""));
            }
        }
        s.oauth1 = Some(o);
    }
    if let Some(v) = m.get("authenticateURLsMatching") {
        let p = join(path, "authenticateURLsMatching");
        let items: Vec<(String, &Value)> = match v {
            Value::Sequence(seq) => seq
                .iter()
                .enumerate()
                .map(|(i, x)| (crate::config::index(&p, i), x))
                .collect(),
            other => vec![(p.clone(), other)],
        };
        for (ip, x) in items {
            let Some(src) = l.non_empty(&ip, x) else {
                continue;
            };
            match regex::Regex::new(&src) {
                Ok(r) => s.url_patterns.push(r),
                Err(e) => l.err(&ip, format!("invalid regular expression: {e}")),
            }
        }
    }
    if let Some(v) = m.get("credentialValidations") {
        let p = join(path, "credentialValidations");
        if let Some(cm) = l.map(&p, v, "a map of credential: regex") {
            for (k, v) in cm {
                let Some(name) = k.as_str() else {
                    l.err(&p, "keys must be strings");
                    continue;
                };
                let cp = join(&p, name);
                if !b.credentials.contains(name) {
                    l.err(&cp, format!("the service gives no credential \"{name}\""));
                }
                let Some(src) = l.non_empty(&cp, v) else {
                    continue;
                };
                match regex::Regex::new(&src) {
                    Ok(r) => s.credential_validations.push((name.to_owned(), r)),
                    Err(e) => l.err(&cp, format!("invalid regular expression: {e}")),
                }
            }
        }
    }
    if let Some(v) = m.get("forceSSL") {
        s.force_ssl = l.boolean(&join(path, "forceSSL"), v).unwrap_or(false);
    }
    if let Some(v) = m.get("keepClientAuthorization") {
        s.keep_client_authorization = l
            .boolean(&join(path, "keepClientAuthorization"), v)
            .unwrap_or(false);
    }
    if let Some(v) = m.get("caFile") {
        s.ca_file = l.non_empty(&join(path, "caFile"), v).map(Into::into);
    }
    if let Some(v) = m.get("timeout") {
        let p = join(path, "timeout");
        if let Some(d) = l.duration(&p, v) {
            if d.is_zero() {
                l.err(&p, "must be more than 0");
            }
            s.timeout = d;
        }
    }
    if let Some(v) = m.get("upstream") {
        let p = join(path, "upstream");
        if let Some(text) = l.non_empty(&p, v) {
            match parse_upstream(&text) {
                Ok(u) => s.upstream = Some(u),
                Err(why) => {
                    let shown = l.shown(&p, &text);
                    l.err(&p, format!("invalid upstream {shown}: {why}"));
                }
            }
        }
    }
    for (apath, a) in b.authentication {
        match a {
            AuthMethod::OAuth2(o) => super::tokens::check(l, apath, o),
        }
    }
    if style == Style::Generic
        && s.headers.is_empty()
        && s.query_params.is_empty()
        && s.oauth1.is_none()
    {
        if b.credentials.is_empty() {
            // An `authentication: [{type: oauth2}]` service: the token as a bearer token
            // (the build refuses a service with neither credentials nor OAuth2).
            let t = Tmpl::parse("Bearer {{ .access_token }}").expect("fixed template");
            s.headers.push((http::header::AUTHORIZATION, t));
        } else {
            let names: Vec<&str> = b.credentials.iter().map(String::as_str).collect();
            let example = names.first().copied().unwrap_or("token");
            l.err(
                path,
                format!(
                    "nothing to inject: give `headers` (or `queryParams`) built from the \
                     credentials ({}), e.g. `headers: {{Authorization: \"Bearer {{{{ .{example} \
                     }}}}\"}}`",
                    names.join(", ")
                ),
            );
        }
    }
    (l.error_count() == before).then(|| Arc::new(s) as Arc<dyn ConnectorSettings>)
}

/// `http://host[:port][/base]` or `https://...`.
fn parse_upstream(text: &str) -> Result<Upstream, &'static str> {
    let uri: http::Uri = text.parse().map_err(|_| "not a URL")?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("the scheme must be http:// or https://"),
    };
    let auth = uri.authority().ok_or("no host")?;
    if auth.as_str().contains('@') {
        return Err("user information in the URL is not supported (use credentials)");
    }
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("no host");
    }
    if uri.query().is_some() {
        return Err("a query string is not supported");
    }
    let port = auth.port_u16().unwrap_or(if https { 443 } else { 80 });
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok(Upstream {
        https,
        host: host.to_owned(),
        port,
        base_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let u = parse_upstream("https://api.novu.co").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port),
            (true, "api.novu.co", 443)
        );
        assert_eq!(u.authority(), "api.novu.co");
        assert_eq!(u.base_path, "");
        let u = parse_upstream("http://127.0.0.1:8080/v1/").unwrap();
        assert_eq!(
            (u.https, u.port, u.base_path.as_str()),
            (false, 8080, "/v1")
        );
        assert_eq!(u.authority(), "127.0.0.1:8080");
        let u = parse_upstream("https://[::1]:8443").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.authority(), "[::1]:8443");
        assert!(parse_upstream("ftp://x").is_err());
        assert!(parse_upstream("api.novu.co").is_err());
        assert!(parse_upstream("https://u:p@x").is_err());
    }
}
