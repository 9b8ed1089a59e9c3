//! The AWS shared configuration files: `~/.aws/config` (`AWS_CONFIG_FILE`) and
//! `~/.aws/credentials` (`AWS_SHARED_CREDENTIALS_FILE`).
//!
//! The format of the AWS SDKs and CLI
//! (<https://docs.aws.amazon.com/sdkref/latest/guide/file-format.html>): INI sections,
//! `key = value` lines, comments on lines of their own starting with `#` or `;`. In the
//! config file a profile is `[default]` or `[profile NAME]` (other sections such as
//! `[sso-session X]` or `[services X]` are not profiles); in the credentials file it is
//! `[NAME]`. Indented lines continue a sub-section (`s3 =` followed by nested keys) and
//! are skipped. Keys are matched case-insensitively. For a key in both files the
//! credentials file wins, as in the SDKs.
//!
//! Values are kept in wiped buffers (`aws_secret_access_key`, `aws_session_token`), and
//! the text of the files is wiped once parsed.

use std::{collections::HashMap, path::PathBuf};

use zeroize::Zeroizing;

use super::AwsEnv;

/// One profile: its keys (lower-case) and values.
#[derive(Default)]
pub struct Profile(HashMap<String, Zeroizing<String>>);

impl Profile {
    /// The value of `key` (any case), when present and not empty.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(&key.to_ascii_lowercase())
            .map(|v| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// Whether `key` is set.
    #[must_use]
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

impl std::fmt::Debug for Profile {
    /// Key names only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<&String> = self.0.keys().collect();
        keys.sort();
        f.debug_tuple("Profile").field(&keys).finish()
    }
}

/// Where the two files are: the environment's paths, else under `$HOME/.aws/`.
#[must_use]
pub fn paths(env: &AwsEnv) -> (Option<PathBuf>, Option<PathBuf>) {
    let home = env.get("HOME").map(PathBuf::from);
    let config = env
        .get("AWS_CONFIG_FILE")
        .map(|p| expand_home(&p, home.as_ref()))
        .or_else(|| home.as_ref().map(|h| h.join(".aws/config")));
    let credentials = env
        .get("AWS_SHARED_CREDENTIALS_FILE")
        .map(|p| expand_home(&p, home.as_ref()))
        .or_else(|| home.as_ref().map(|h| h.join(".aws/credentials")));
    (config, credentials)
}

fn expand_home(p: &str, home: Option<&PathBuf>) -> PathBuf {
    match (p.strip_prefix("~/"), home) {
        (Some(rest), Some(h)) => h.join(rest),
        _ => PathBuf::from(p),
    }
}

/// The profile named `name` from both files (`None` when neither file has it), and the
/// files that were looked at (for messages). A file that does not exist counts as
/// empty; one that cannot be read is an error naming it.
///
/// # Errors
/// A file that exists but cannot be read, or is larger than 1 MiB.
pub fn load(env: &AwsEnv, name: &str) -> Result<(Option<Profile>, Vec<PathBuf>), String> {
    let (config, credentials) = paths(env);
    let mut found: Option<Profile> = None;
    let mut looked = Vec::new();
    for (path, is_config) in [(config, true), (credentials, false)] {
        let Some(path) = path else { continue };
        let text = match read_small(&path) {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        looked.push(path);
        if let Some(p) = parse(&text, name, is_config) {
            // The credentials file comes second and wins.
            let into = found.get_or_insert_with(Profile::default);
            into.0.extend(p.0);
        }
    }
    Ok((found, looked))
}

/// A file's text, `None` when it does not exist.
fn read_small(path: &std::path::Path) -> std::io::Result<Option<Zeroizing<String>>> {
    use std::io::Read as _;
    const MAX: u64 = 1024 * 1024;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = Zeroizing::new(String::new());
    f.take(MAX + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX {
        return Err(std::io::Error::other("larger than 1 MiB"));
    }
    Ok(Some(text))
}

/// The section of profile `name` in one file's text; sections of the same name are
/// merged (later keys win).
#[must_use]
pub fn parse(text: &str, name: &str, is_config: bool) -> Option<Profile> {
    let mut out: Option<Profile> = None;
    let mut in_profile = false;
    for raw in text.lines() {
        if raw.starts_with([' ', '\t']) {
            // A sub-section's nested key, or a continuation: not a profile key.
            continue;
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            let Some(end) = header.find(']') else {
                in_profile = false;
                continue;
            };
            in_profile = section_name(header[..end].trim(), is_config) == Some(name);
            if in_profile {
                out.get_or_insert_with(Profile::default);
            }
            continue;
        }
        if !in_profile {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let key = k.trim().to_ascii_lowercase();
        let mut value = v.trim();
        // An inline comment needs whitespace before it (`key = value ; comment`).
        for marker in [" #", " ;", "\t#", "\t;"] {
            if let Some(i) = value.find(marker) {
                value = value[..i].trim_end();
            }
        }
        if let Some(p) = out.as_mut() {
            p.0.insert(key, Zeroizing::new(value.to_owned()));
        }
    }
    out
}

/// The profile a section header names, if it names one.
fn section_name(header: &str, is_config: bool) -> Option<&str> {
    if !is_config {
        return (!header.is_empty() && !header.starts_with("profile ")).then_some(header);
    }
    if header == "default" {
        return Some("default");
    }
    header
        .strip_prefix("profile")
        .filter(|rest| rest.starts_with([' ', '\t']))
        .map(str::trim)
        .filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "\
# a comment
[default]
region = eu-west-1

[profile dev]
region=us-east-2 ; where dev runs
s3 =
  max_concurrent_requests = 20
role_arn = arn:aws:iam::123456789012:role/dev

[sso-session corp]
sso_region = us-east-1

[dev]
region = ignored-in-the-config-file
";

    const CREDENTIALS: &str = "\
[default]
aws_access_key_id = AKIDDEFAULT
aws_secret_access_key = c2VjcmV0#with-a-hash
[dev]
AWS_ACCESS_KEY_ID = AKIDDEV
aws_secret_access_key = devsecret
[profile dev]
aws_access_key_id = IGNORED
";

    #[test]
    fn config_file_profiles() {
        let d = parse(CONFIG, "default", true).expect("default");
        assert_eq!(d.get("region"), Some("eu-west-1"));
        let dev = parse(CONFIG, "dev", true).expect("dev");
        assert_eq!(dev.get("region"), Some("us-east-2"), "inline comment cut");
        assert_eq!(
            dev.get("max_concurrent_requests"),
            None,
            "nested key skipped"
        );
        assert_eq!(dev.get("s3"), None, "an empty value is unset");
        assert!(dev.has("role_arn"));
        assert!(parse(CONFIG, "corp", true).is_none(), "not a profile");
        assert!(parse(CONFIG, "missing", true).is_none());
    }

    #[test]
    fn credentials_file_profiles() {
        let d = parse(CREDENTIALS, "default", false).expect("default");
        assert_eq!(d.get("aws_access_key_id"), Some("AKIDDEFAULT"));
        // A `#` without whitespace before it is part of the value.
        assert_eq!(d.get("aws_secret_access_key"), Some("c2VjcmV0#with-a-hash"));
        let dev = parse(CREDENTIALS, "dev", false).expect("dev");
        assert_eq!(
            dev.get("aws_access_key_id"),
            Some("AKIDDEV"),
            "keys any case"
        );
        assert!(parse(CREDENTIALS, "profile dev", false).is_none());
        assert!(format!("{dev:?}").contains("aws_secret_access_key"));
        assert!(!format!("{dev:?}").contains("devsecret"));
    }

    #[test]
    fn files_merge_and_credentials_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config");
        let creds = dir.path().join("credentials");
        std::fs::write(
            &config,
            "[profile dev]\nregion = ap-south-1\naws_access_key_id = FROMCONFIG\n",
        )
        .expect("write");
        std::fs::write(&creds, "[dev]\naws_access_key_id = FROMCREDS\n").expect("write");
        let env = AwsEnv::from_pairs(&[
            ("AWS_CONFIG_FILE", config.to_str().expect("utf-8")),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                creds.to_str().expect("utf-8"),
            ),
        ]);
        let (p, looked) = load(&env, "dev").expect("load");
        let p = p.expect("found");
        assert_eq!(p.get("region"), Some("ap-south-1"));
        assert_eq!(p.get("aws_access_key_id"), Some("FROMCREDS"));
        assert_eq!(looked.len(), 2);
        let (none, _) = load(&env, "other").expect("load");
        assert!(none.is_none());
        // Missing files are empty; HOME supplies the defaults.
        let env = AwsEnv::from_pairs(&[("HOME", dir.path().to_str().expect("utf-8"))]);
        let (none, looked) = load(&env, "default").expect("load");
        assert!(none.is_none() && looked.is_empty());
    }
}
