//! Credential ids of the `vault` provider, read as Secretless reads them:
//! `PATH[#FIELD]`.
//!
//! * `PATH` is the API path after `/v1/` (`kv/db`, `secret/data/db`,
//!   `database/creds/app`); a leading `/` is ignored (Secretless' documentation writes
//!   `/path/to/secret`).
//! * `FIELD` is a dotted path into the reply's `data` object (`password`,
//!   `data.password`); without `#` it is `value`.
//!
//! On a KV version 2 mount, a path without a `/data/` segment is the secret's own path
//! (`secret/db#password`, as `vault kv get -field=password secret/db` takes it): the
//! provider reads `secret/data/db` and the field under `data.`. A path with `/data/` is
//! read as written (`secret/data/db#data.password`, Secretless' form).

use zeroize::Zeroize as _;

/// The field read when an id has no `#FIELD` (Secretless' `DefaultField`).
pub const DEFAULT_FIELD: &str = "value";

/// A parsed id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultId {
    /// The API path, without `/v1/` and without leading or trailing `/`.
    pub path: String,
    /// Dotted path into the reply's `data`.
    pub field: String,
}

impl VaultId {
    /// Parse `PATH[#FIELD]`.
    ///
    /// # Errors
    /// An empty path or field, an empty, `.` or `..` path segment, an empty part in the
    /// field, a control character.
    pub fn parse(id: &str) -> Result<Self, String> {
        let (path, field) = match id.split_once('#') {
            Some((p, f)) => (p, f),
            None => (id, DEFAULT_FIELD),
        };
        if id.chars().any(char::is_control) {
            return Err("the id contains a control character".into());
        }
        let path = path.trim_start_matches('/').trim_end_matches('/');
        if path.is_empty() {
            return Err("no secret path before `#`".into());
        }
        if path
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err("the path has an empty, `.` or `..` segment".into());
        }
        if field.is_empty() {
            return Err("no field after `#`".into());
        }
        if field.split('.').any(str::is_empty) {
            return Err("the field has an empty part (`a..b`, `.a`, `a.`)".into());
        }
        Ok(Self {
            path: path.to_owned(),
            field: field.to_owned(),
        })
    }

    /// Whether the path is written in the KV v2 API form (`secret/data/...`) and so is
    /// read as written.
    #[must_use]
    pub fn has_data_segment(&self) -> bool {
        self.path.contains("/data/")
    }

    /// The id on a KV v2 mount `mount` (no slashes around it): the API path with
    /// `/data/` after the mount, the field under `data.`. None when the path is the
    /// mount itself, or is not under it.
    #[must_use]
    pub fn on_kv2(&self, mount: &str) -> Option<Self> {
        let rest = self.path.strip_prefix(mount)?.strip_prefix('/')?;
        if rest.is_empty() {
            return None;
        }
        Some(Self {
            path: format!("{mount}/data/{rest}"),
            field: format!("data.{}", self.field),
        })
    }
}

/// Why a field could not be taken from a reply (never carries the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldError {
    Missing,
    Null,
}

/// The value at the dotted `field` of `data`: object keys (and numeric indexes into
/// arrays). A string is its bytes; a number or a boolean its text; an object or an
/// array its compact JSON.
///
/// # Errors
/// The field is not there, or is `null`.
pub fn select(data: &serde_json::Value, field: &str) -> Result<Vec<u8>, FieldError> {
    let v = field
        .split('.')
        .try_fold(data, |cur, part| match cur {
            serde_json::Value::Object(m) => m.get(part),
            serde_json::Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        })
        .ok_or(FieldError::Missing)?;
    match v {
        serde_json::Value::String(s) => Ok(s.as_bytes().to_vec()),
        serde_json::Value::Number(n) => Ok(n.to_string().into_bytes()),
        serde_json::Value::Bool(b) => Ok(b.to_string().into_bytes()),
        serde_json::Value::Null => Err(FieldError::Null),
        v @ (serde_json::Value::Array(_) | serde_json::Value::Object(_)) => {
            serde_json::to_vec(v).map_err(|_| FieldError::Missing)
        }
    }
}

/// Overwrite every string (and object key) of a parsed reply before it is dropped.
pub fn wipe_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(wipe_json),
        serde_json::Value::Object(m) => {
            for (_, x) in m.iter_mut() {
                wipe_json(x);
            }
            // Keys cannot be changed in place; field names are not values anyway.
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(path: &str, field: &str) -> VaultId {
        VaultId {
            path: path.into(),
            field: field.into(),
        }
    }

    /// Every form Secretless documents and tests (internal/providers/vault,
    /// test/providers/vault), read the way its `parseVaultID` reads them.
    #[test]
    fn secretless_id_forms() {
        for (text, want) in [
            ("kv/x", id("kv/x", "value")),
            ("kv/x#f", id("kv/x", "f")),
            ("kv/db/password#password", id("kv/db/password", "password")),
            ("kv/web/password", id("kv/web/password", "value")),
            ("secret/data/x#data.f", id("secret/data/x", "data.f")),
            (
                "secret/data/service#data.api-key",
                id("secret/data/service", "data.api-key"),
            ),
            (
                "cubbyhole/first-secret#some-key",
                id("cubbyhole/first-secret", "some-key"),
            ),
            (
                "cubbyhole/second-secret",
                id("cubbyhole/second-secret", "value"),
            ),
            ("foobar", id("foobar", "value")),
            (
                "cubbyhole/first-secret#foo.bar",
                id("cubbyhole/first-secret", "foo.bar"),
            ),
            // The documentation's `/path/to/secret/in/vault#navigate.to.this.field`.
            (
                "/path/to/secret/in/vault#navigate.to.this.field",
                id("path/to/secret/in/vault", "navigate.to.this.field"),
            ),
            (
                "database/creds/app#username",
                id("database/creds/app", "username"),
            ),
            // Only the first `#` splits (Go's SplitN(id, "#", 2)).
            ("kv/x#a#b", id("kv/x", "a#b")),
            ("kv/x/", id("kv/x", "value")),
        ] {
            assert_eq!(VaultId::parse(text).as_ref(), Ok(&want), "{text}");
        }
    }

    #[test]
    fn bad_ids_are_refused() {
        for text in [
            "",
            "#f",
            "/",
            "kv/x#",
            "kv//x",
            "kv/./x",
            "kv/../x",
            "kv/x#a..b",
            "kv/x#.a",
            "kv/x#a.",
            "kv/x\n#f",
        ] {
            assert!(VaultId::parse(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn kv2_translation() {
        let x = VaultId::parse("secret/app/db#password").unwrap();
        assert!(!x.has_data_segment());
        assert_eq!(
            x.on_kv2("secret"),
            Some(id("secret/data/app/db", "data.password"))
        );
        let d = VaultId::parse("secret/app/db").unwrap();
        assert_eq!(
            d.on_kv2("secret"),
            Some(id("secret/data/app/db", "data.value"))
        );
        // Mounts with slashes in them, the mount itself, another mount.
        let n = VaultId::parse("team/kv/app#k").unwrap();
        assert_eq!(n.on_kv2("team/kv"), Some(id("team/kv/data/app", "data.k")));
        assert_eq!(VaultId::parse("secret").unwrap().on_kv2("secret"), None);
        assert_eq!(x.on_kv2("secre"), None);
        assert!(
            VaultId::parse("secret/data/x#data.f")
                .unwrap()
                .has_data_segment()
        );
    }

    #[test]
    fn fields_are_selected_like_secretless() {
        let data = serde_json::json!({
            "value": "v", "n": 5, "b": true, "nil": null,
            "data": {"f": "inner", "deep": {"x": "y"}}, "list": ["a", "b"]
        });
        let s = |f: &str| select(&data, f).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(s("value").unwrap(), "v");
        assert_eq!(s("data.f").unwrap(), "inner");
        assert_eq!(s("data.deep.x").unwrap(), "y");
        assert_eq!(s("n").unwrap(), "5");
        assert_eq!(s("b").unwrap(), "true");
        assert_eq!(s("list.1").unwrap(), "b");
        assert_eq!(s("data.deep").unwrap(), r#"{"x":"y"}"#);
        assert_eq!(s("nil"), Err(FieldError::Null));
        assert_eq!(s("data.nope"), Err(FieldError::Missing));
        assert_eq!(s("value.x"), Err(FieldError::Missing));
    }
}
