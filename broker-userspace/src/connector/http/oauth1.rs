//! OAuth 1.0a request signing (RFC 5849) with HMAC-SHA1, as Secretless' `generic_http`
//! does with its `oauth1:` block (`consumer_key`, `consumer_secret`, `token`,
//! `token_secret`, each a template over the credentials).
//!
//! The signature covers the method, the base URL (3.4.1.2: scheme and host lowercase,
//! default port omitted, no query), and every query and form-body parameter with the
//! `oauth_*` protocol parameters (3.4.1.3), each decoded then re-encoded with the RFC 3986
//! unreserved set (3.6) and sorted by name then value. The request must be final (query
//! parameters injected) before it is signed. I/O-free: nonce and timestamp are inputs.

use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use zeroize::Zeroizing;

use super::inject::encode_component;
use crate::secret::Secret;

/// The four values of an `oauth1:` block, rendered.
pub struct OAuth1Keys {
    pub consumer_key: String,
    pub consumer_secret: Secret,
    pub token: String,
    pub token_secret: Secret,
}

/// The keys of an `oauth1:` block (all four required).
pub const KEYS: [&str; 4] = ["consumer_key", "consumer_secret", "token", "token_secret"];

/// What one signature covers besides the keys.
pub struct SignInput<'a> {
    pub method: &'a str,
    /// `https`, `http`.
    pub scheme: &'a str,
    /// The host as the request names it (no port).
    pub host: &'a str,
    pub port: Option<u16>,
    pub path: &'a str,
    /// The raw query string (without `?`), if any.
    pub query: Option<&'a str>,
    /// An `application/x-www-form-urlencoded` body (single-part), if the request has one.
    pub form: Option<&'a [u8]>,
    pub nonce: &'a str,
    pub timestamp: u64,
}

fn enc(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    encode_component(v, &mut out);
    String::from_utf8(out).expect("percent-encoded ASCII")
}

/// The signature base string (RFC 5849 3.4.1).
#[must_use]
pub fn base_string(keys: &OAuth1Keys, i: &SignInput<'_>) -> String {
    let scheme = i.scheme.to_ascii_lowercase();
    let host = i.host.to_ascii_lowercase();
    let default = if scheme == "https" { 443 } else { 80 };
    let authority = match i.port {
        Some(p) if p != default => format!("{host}:{p}"),
        _ => host,
    };
    let path = if i.path.is_empty() { "/" } else { i.path };
    let base_url = format!("{scheme}://{authority}{path}");
    let mut params: Vec<(String, String)> = Vec::new();
    let mut add = |raw: &[u8]| {
        for (k, v) in form_urlencoded::parse(raw) {
            params.push((enc(k.as_bytes()), enc(v.as_bytes())));
        }
    };
    if let Some(q) = i.query {
        add(q.as_bytes());
    }
    if let Some(f) = i.form {
        add(f);
    }
    let ts = i.timestamp.to_string();
    for (k, v) in [
        ("oauth_consumer_key", keys.consumer_key.as_str()),
        ("oauth_nonce", i.nonce),
        ("oauth_signature_method", "HMAC-SHA1"),
        ("oauth_timestamp", ts.as_str()),
        ("oauth_token", keys.token.as_str()),
        ("oauth_version", "1.0"),
    ] {
        params.push((k.to_owned(), enc(v.as_bytes())));
    }
    params.sort();
    let normalized = params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    format!(
        "{}&{}&{}",
        i.method.to_ascii_uppercase(),
        enc(base_url.as_bytes()),
        enc(normalized.as_bytes())
    )
}

/// The HMAC-SHA1 signature, base64 (RFC 5849 3.4.2).
#[must_use]
pub fn signature(keys: &OAuth1Keys, i: &SignInput<'_>) -> String {
    let mut key = Zeroizing::new(Vec::new());
    encode_component(keys.consumer_secret.expose(), &mut key);
    key.push(b'&');
    encode_component(keys.token_secret.expose(), &mut key);
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(base_string(keys, i).as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The `Authorization: OAuth ...` header value (RFC 5849 3.5.1).
#[must_use]
pub fn authorization(keys: &OAuth1Keys, i: &SignInput<'_>) -> String {
    let sig = signature(keys, i);
    format!(
        "OAuth oauth_consumer_key=\"{}\", oauth_nonce=\"{}\", oauth_signature=\"{}\", \
         oauth_signature_method=\"HMAC-SHA1\", oauth_timestamp=\"{}\", oauth_token=\"{}\", \
         oauth_version=\"1.0\"",
        enc(keys.consumer_key.as_bytes()),
        enc(i.nonce.as_bytes()),
        enc(sig.as_bytes()),
        i.timestamp,
        enc(keys.token.as_bytes()),
    )
}

/// A fresh nonce: 32 alphanumeric characters.
#[must_use]
pub fn nonce() -> String {
    use rand::Rng as _;
    const SET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut r = rand::rng();
    (0..32)
        .map(|_| char::from(SET[r.random_range(0..SET.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of Twitter's "Creating a signature" guide (a published
    /// HMAC-SHA1 OAuth 1.0a vector): query and form parameters, `+`, `,` and `!`.
    #[test]
    fn published_vector() {
        let keys = OAuth1Keys {
            consumer_key: "xvz1evFS4wEEPTGEFPHBog".into(),
            consumer_secret: Secret::from(String::from(
                "kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw",
            )),
            token: "370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb".into(),
            token_secret: Secret::from(String::from("LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE")),
        };
        let i = SignInput {
            method: "post",
            scheme: "https",
            host: "api.twitter.com",
            port: Some(443),
            path: "/1.1/statuses/update.json",
            query: Some("include_entities=true"),
            form: Some(
                b"status=Hello%20Ladies%20%2b%20Gentlemen%2c%20a%20signed%20OAuth%20request%21",
            ),
            nonce: "kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg",
            timestamp: 1_318_622_958,
        };
        assert_eq!(
            base_string(&keys, &i),
            "POST&https%3A%2F%2Fapi.twitter.com%2F1.1%2Fstatuses%2Fupdate.json&include_entities%3Dtrue%26oauth_consumer_key%3Dxvz1evFS4wEEPTGEFPHBog%26oauth_nonce%3DkYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg%26oauth_signature_method%3DHMAC-SHA1%26oauth_timestamp%3D1318622958%26oauth_token%3D370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb%26oauth_version%3D1.0%26status%3DHello%2520Ladies%2520%252B%2520Gentlemen%252C%2520a%2520signed%2520OAuth%2520request%2521"
        );
        assert_eq!(signature(&keys, &i), "hCtSmYh+iHYCEqBWrE7C7hYmtUk=");
        let h = authorization(&keys, &i);
        assert!(
            h.contains("oauth_signature=\"hCtSmYh%2BiHYCEqBWrE7C7hYmtUk%3D\""),
            "{h}"
        );
        assert!(
            !h.contains("kAcSOq") && !h.contains("LswwdoU"),
            "no secret in the header"
        );
    }

    #[test]
    fn base_url_normalization() {
        let keys = OAuth1Keys {
            consumer_key: "k".into(),
            consumer_secret: Secret::from(String::from("s")),
            token: "t".into(),
            token_secret: Secret::from(String::from("ts")),
        };
        let mut i = SignInput {
            method: "GET",
            scheme: "HTTP",
            host: "Example.COM",
            port: Some(80),
            path: "",
            query: Some("b=2&a=3&a=1&c"),
            form: None,
            nonce: "n",
            timestamp: 1,
        };
        let b = base_string(&keys, &i);
        assert!(
            b.starts_with("GET&http%3A%2F%2Fexample.com%2F&a%3D1%26a%3D3%26b%3D2%26c%3D%26"),
            "{b}"
        );
        i.port = Some(8080);
        assert!(base_string(&keys, &i).starts_with("GET&http%3A%2F%2Fexample.com%3A8080%2F&"));
        assert_eq!(nonce().len(), 32);
    }
}
