//! `${VAR}` expansion in scalar strings, done after YAML parsing.
//!
//! - `${VAR}`: the value of `VAR`; an error when it is unset.
//! - `${VAR:-default}`: the value of `VAR`, or `default` when it is unset or empty.
//! - `$$`: a literal `$`.
//! - any other `$` is kept as written (so `$HOME` or Go templates pass through).
//!
//! Errors name the variable, never its value or the string it was in.

/// The result of expanding one string.
pub(super) struct Expanded {
    pub text: String,
    /// At least one variable's value (not a default) went into `text`; such a value may
    /// be a secret and must never be echoed.
    pub from_env: bool,
}

/// Whether `s` holds a `${NAME}` or `${NAME:-default}` reference.
pub(super) fn has_reference(s: &str) -> bool {
    let mut rest = s;
    while let Some(pos) = rest.find("${") {
        let body = &rest[pos + 2..];
        if let Some(end) = body.find('}') {
            let name = body[..end].split(":-").next().unwrap_or_default();
            if valid_name(name) {
                return true;
            }
        }
        rest = body;
    }
    false
}

/// Whether `s` is one reference and nothing else (`${NAME}`, `${NAME:-default}`): then
/// the name is a reference, not a piece of a value.
pub(super) fn is_whole_reference(s: &str) -> bool {
    s.strip_prefix("${")
        .and_then(|b| b.strip_suffix('}'))
        .is_some_and(|body| !body.contains('}') && !body.contains("${"))
}

/// Expand every reference in `s`.
///
/// # Errors
/// One message per problem (unset variable, bad name, unterminated reference).
pub(super) fn expand(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Expanded, Vec<String>> {
    let mut out = String::with_capacity(s.len());
    let mut errors = Vec::new();
    let mut from_env = false;
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body_and_tail) = after.strip_prefix('{') {
            let Some(end) = body_and_tail.find('}') else {
                errors.push("unterminated \"${\" (use \"$$\" for a literal \"$\")".to_owned());
                rest = "";
                break;
            };
            let body = &body_and_tail[..end];
            rest = &body_and_tail[end + 1..];
            let (name, default) = match body.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (body, None),
            };
            if !valid_name(name) {
                errors.push(format!(
                    "invalid variable name in \"${{{}}}\": names are letters, digits and \"_\"",
                    if name.len() <= 64 && valid_chars(name) {
                        name
                    } else {
                        "..."
                    }
                ));
                continue;
            }
            match (env(name), default) {
                (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                (Some(v), _) => {
                    out.push_str(&v);
                    from_env = true;
                }
                (None, Some(d)) => out.push_str(d),
                (None, None) => errors.push(format!("environment variable {name} is not set")),
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    if errors.is_empty() {
        Ok(Expanded {
            text: out,
            from_env,
        })
    } else {
        Err(errors)
    }
}

fn valid_chars(name: &str) -> bool {
    name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn valid_name(name: &str) -> bool {
    name.as_bytes()
        .first()
        .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_')
        && valid_chars(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".into()),
            "EMPTY" => Some(String::new()),
            "_B1" => Some("b".into()),
            _ => None,
        }
    }

    fn ok(s: &str) -> (String, bool) {
        let e = expand(s, &env).unwrap_or_else(|e| panic!("{s}: {e:?}"));
        (e.text, e.from_env)
    }

    #[test]
    fn expands() {
        assert_eq!(ok("plain"), ("plain".into(), false));
        assert_eq!(ok("${A}"), ("alpha".into(), true));
        assert_eq!(ok("x-${A}-${_B1}-y"), ("x-alpha-b-y".into(), true));
        assert_eq!(ok("${NOPE:-dflt}"), ("dflt".into(), false));
        assert_eq!(ok("${EMPTY:-dflt}"), ("dflt".into(), false));
        assert_eq!(ok("${A:-dflt}"), ("alpha".into(), true));
        assert_eq!(ok("${NOPE:-}"), (String::new(), false));
        assert_eq!(ok("$$"), ("$".into(), false));
        assert_eq!(ok("$${A}"), ("${A}".into(), false));
        assert_eq!(
            ok("cost $5 $HOME {{ .x }}"),
            ("cost $5 $HOME {{ .x }}".into(), false)
        );
        assert_eq!(ok("end$"), ("end$".into(), false));
    }

    #[test]
    fn errors_name_the_variable() {
        let e = expand("${NOPE} and ${ALSO_NOPE}", &env).err().unwrap();
        assert_eq!(
            e,
            vec![
                "environment variable NOPE is not set".to_owned(),
                "environment variable ALSO_NOPE is not set".to_owned()
            ]
        );
        assert!(expand("${A", &env).err().unwrap()[0].contains("unterminated"));
        assert!(expand("${1A}", &env).err().unwrap()[0].contains("invalid variable name"));
        assert!(expand("${}", &env).err().unwrap()[0].contains("invalid variable name"));
    }
}
