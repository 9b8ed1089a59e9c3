//! What the broker adds to an authenticated request: the rendered `headers` and
//! `queryParams` templates, or `basic_auth`'s header. Templates go through [`Tmpl`], the
//! one seam to [`super::template`].

use std::fmt;

use base64::Engine as _;
use zeroize::Zeroizing;

/// A parsed header or query-parameter template ([`super::template`]).
pub struct Tmpl(super::template::Template);

impl fmt::Debug for Tmpl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tmpl({:?})", self.names())
    }
}

impl Tmpl {
    /// # Errors
    /// A template that does not parse (the message quotes no credential).
    pub fn parse(src: &str) -> Result<Self, String> {
        super::template::Template::parse(src)
            .map(Self)
            .map_err(|e| e.to_string())
    }

    /// The credentials the template reads.
    #[must_use]
    pub fn names(&self) -> Vec<&str> {
        self.0.names()
    }

    /// The value, over `get` (credential name -> value).
    ///
    /// # Errors
    /// A credential the template names is missing (the message names it, never a value).
    pub fn render<'v>(
        &self,
        get: &dyn Fn(&str) -> Option<&'v [u8]>,
    ) -> Result<Zeroizing<Vec<u8>>, String> {
        self.0.render(get).map_err(|e| e.to_string())
    }
}

/// `Basic base64(username:password)`.
#[must_use]
pub fn basic(username: &[u8], password: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut pair = Zeroizing::new(Vec::with_capacity(username.len() + password.len() + 1));
    pair.extend_from_slice(username);
    pair.push(b':');
    pair.extend_from_slice(password);
    let enc = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*pair));
    let mut out = Zeroizing::new(b"Basic ".to_vec());
    out.extend_from_slice(enc.as_bytes());
    out
}

/// Percent-encode a query component (RFC 3986 unreserved characters kept).
pub fn encode_component(v: &[u8], out: &mut Vec<u8>) {
    for &b in v {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_names() {
        let t = Tmpl::parse("Bearer {{ .token }}!").unwrap();
        assert_eq!(t.names(), vec!["token"]);
        let get = |n: &str| (n == "token").then_some(&b"abc"[..]);
        assert_eq!(&t.render(&get).unwrap()[..], b"Bearer abc!");
        let t = Tmpl::parse("{{ .token | base64 }}").unwrap();
        assert_eq!(&t.render(&get).unwrap()[..], b"YWJj");
        assert!(Tmpl::parse("{{ .x ").is_err());
        assert!(Tmpl::parse("{{ .missing }}").unwrap().render(&get).is_err());
        assert_eq!(&basic(b"u", b"p")[..], b"Basic dTpw");
        let mut q = Vec::new();
        encode_component(b"a b&c=d/\xff", &mut q);
        assert_eq!(q, b"a%20b%26c%3Dd%2F%FF");
    }
}
