//! What the command line holds beyond clap's grammar (`main.rs` stays thin):
//!
//! * the **Secretless form**: `broker -f FILE [-debug] [-watch] ...`, how the Secretless
//!   Broker image is started (`args: ["-f", "/etc/secretless/secretless.yml"]`), parsed
//!   exactly as Go's `flag` package parses `secretless-broker`'s flags (`-f FILE`,
//!   `-f=FILE`, `--f FILE`, bool flags as `-debug` or `-debug=false`, parsing stops at
//!   the first non-flag or at `--`). An invocation is in this form when its first word
//!   (after our global `--log-level`/`--log-format`) is a flag that is not clap's
//!   `-h`/`--help`/`-V`/`--version`; every subcommand form (`broker run -f F`) is
//!   clap's, untouched.
//! * `--log-level` checked, not silently replaced by `info`;
//! * `broker exec` without `--` explained.

use std::{
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// The subcommands clap knows (and `help`, which clap adds).
pub const SUBCOMMANDS: &[&str] = &["run", "exec", "check", "ca", "status", "version", "help"];

/// Global options of the clap form that take a value.
const GLOBAL_WITH_VALUE: &[&str] = &["--log-level", "--log-format"];

/// Secretless' default plugin directory (`-p`).
pub const SECRETLESS_PLUGIN_DIR: &str = "/usr/local/lib/secretless";

/// The first word after the global options, and its index.
fn first_word(args: &[OsString]) -> Option<(usize, &str)> {
    let mut i = 0;
    while i < args.len() {
        let a = args[i].to_str()?;
        if GLOBAL_WITH_VALUE.contains(&a) {
            i += 2;
            continue;
        }
        if GLOBAL_WITH_VALUE
            .iter()
            .any(|g| a.strip_prefix(g).is_some_and(|r| r.starts_with('=')))
        {
            i += 1;
            continue;
        }
        return Some((i, a));
    }
    None
}

/// Whether `args` (without the program name) is the Secretless form.
#[must_use]
pub fn is_secretless_form(args: &[OsString]) -> bool {
    match first_word(args) {
        None => false,
        Some((_, w)) => {
            !SUBCOMMANDS.contains(&w)
                && !matches!(w, "-h" | "--help" | "-V" | "--version")
                && w.len() > 1
                && w.starts_with('-')
        }
    }
}

/// When clap rejected a `broker exec` invocation that has no `--`: the message that
/// says where the command goes (naming the word taken for it, if any).
#[must_use]
pub fn exec_without_separator(args: &[OsString]) -> Option<String> {
    let (at, word) = first_word(args)?;
    if word != "exec" {
        return None;
    }
    let rest = &args[at + 1..];
    if rest.iter().any(|a| a == "--") {
        return None;
    }
    // The first word that is neither an option nor an option's value.
    let mut stray = None;
    let mut i = 0;
    while i < rest.len() {
        let a = rest[i].to_string_lossy();
        let takes_value = matches!(
            a.as_ref(),
            "-f" | "-c" | "--file" | "--config" | "--log-level" | "--log-format"
        );
        if takes_value {
            i += 2;
            continue;
        }
        if !a.starts_with('-') || a == "-" {
            stray = Some(a.into_owned());
            break;
        }
        i += 1;
    }
    let usage = "broker exec -f FILE -- COMMAND [ARGS...]";
    Some(match stray {
        Some(w) => format!(
            "broker exec: put the command after `--` (found `{w}` before it), so that its own flags are not taken for the broker's:\n  {usage}"
        ),
        None => format!("broker exec: the command to run goes after `--`:\n  {usage}"),
    })
}

/// The log filter from `--log-level` (or `BROKER_LOG`): `tracing` env-filter syntax,
/// where a bare word must be a level (`info`); a bare word that is not one would be
/// read as a target name and silence every other line (`--log-level verbose`), so it
/// is an error, as is any directive the filter cannot parse.
///
/// # Errors
/// What is wrong, quoting the value (a log level holds no secret).
pub fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    const LEVELS: &str = "trace, debug, info, warn, error or off";
    for d in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !d.contains('=') && !d.contains('[');
        if bare
            && d.parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Err(format!(
                "`{d}` is not a log level ({LEVELS}); to filter by target, give it a level: `{d}=debug`"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level).map_err(|e| format!("{e} (levels: {LEVELS})"))
}

/// Secretless' flags, as Go's `flag` package parsed them (plus ours: `-health-addr`,
/// `-log-level`, `-log-format`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretlessArgs {
    pub file: String,
    pub config_mgr: String,
    pub debug: bool,
    pub watch: bool,
    pub profile: String,
    pub plugin_dir: String,
    pub plugin_checksums: String,
    pub graceful_exit: bool,
    pub version: bool,
    pub health_addr: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    /// Arguments after the flags (`version` shows the version, as in Secretless).
    pub positional: Vec<String>,
}

impl Default for SecretlessArgs {
    fn default() -> Self {
        Self {
            file: String::new(),
            config_mgr: "configfile".into(),
            debug: false,
            watch: false,
            profile: String::new(),
            plugin_dir: SECRETLESS_PLUGIN_DIR.into(),
            plugin_checksums: String::new(),
            graceful_exit: false,
            version: false,
            health_addr: None,
            log_level: None,
            log_format: None,
            positional: Vec::new(),
        }
    }
}

/// Why the Secretless form was not parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlagError {
    /// `-h`, `-help`: print [`SECRETLESS_USAGE`], exit 0.
    Help,
    /// A usage error (Go prints it and the usage, and exits 2).
    Usage(String),
}

/// The usage of the Secretless form.
pub const SECRETLESS_USAGE: &str = "\
Usage: broker -f FILE [flags]   (Secretless Broker's invocation; `broker --help` for the rest)
  -f string
    \tLocation of the configuration file.
  -config-mgr string
    \tconfigfile[#FILE] (the default); k8s/crd is not supported (default \"configfile\")
  -debug
    \tEnable debug logging.
  -watch
    \tAccepted; reload on configuration change is not built yet (the file is read once).
  -graceful-exit
    \tAccepted; the broker always drains its connections on SIGTERM.
  -p string
    \tDirectory of Secretless Go plugins: not loaded (named in a warning). (default \"/usr/local/lib/secretless\")
  -s string
    \tPlugin checksums file: ignored.
  -profile string
    \tNot supported (Go profiling).
  -version
    \tShow the version.
  -health-addr string
    \tHealth endpoint address (/live, /ready): IP:PORT or off; overrides broker.health (default 127.0.0.1:5335).
  -log-level string
    \tLog filter (tracing env-filter syntax); overrides -debug.
  -log-format string
    \ttext or json.
";

/// Go's `strconv.ParseBool`.
fn go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Parse the Secretless form as Go's `flag.Parse` would.
///
/// # Errors
/// [`FlagError::Help`] for `-h`/`-help`, [`FlagError::Usage`] with Go's wording for an
/// unknown flag, a missing value or a bad boolean.
pub fn parse_secretless(args: &[OsString]) -> Result<SecretlessArgs, FlagError> {
    let mut out = SecretlessArgs::default();
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.to_str().map(str::to_owned).ok_or_else(|| {
                FlagError::Usage(format!(
                    "argument {} is not valid UTF-8",
                    a.to_string_lossy()
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let mut i = 0;
    while i < args.len() {
        let s = &args[i];
        if s.len() < 2 || !s.starts_with('-') {
            break;
        }
        let name_part = if let Some(rest) = s.strip_prefix("--") {
            if rest.is_empty() {
                i += 1; // "--" ends the flags
                break;
            }
            rest
        } else {
            &s[1..]
        };
        if name_part.starts_with('-') || name_part.starts_with('=') {
            return Err(FlagError::Usage(format!("bad flag syntax: {s}")));
        }
        i += 1;
        let (name, inline) = match name_part.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (name_part, None),
        };
        let boolean = |v: Option<String>| -> Result<bool, FlagError> {
            match v {
                None => Ok(true),
                Some(v) => go_bool(&v).ok_or_else(|| {
                    FlagError::Usage(format!(
                        "invalid boolean value {v:?} for -{name}: parse error"
                    ))
                }),
            }
        };
        match name {
            "debug" => out.debug = boolean(inline)?,
            "watch" => out.watch = boolean(inline)?,
            "graceful-exit" => out.graceful_exit = boolean(inline)?,
            "version" => out.version = boolean(inline)?,
            "f" | "config-mgr" | "profile" | "p" | "s" | "health-addr" | "log-level"
            | "log-format" => {
                let value = match inline {
                    Some(v) => v,
                    None if i < args.len() => {
                        i += 1;
                        args[i - 1].clone()
                    }
                    None => {
                        return Err(FlagError::Usage(format!("flag needs an argument: -{name}")));
                    }
                };
                match name {
                    "f" => out.file = value,
                    "config-mgr" => out.config_mgr = value,
                    "profile" => out.profile = value,
                    "p" => out.plugin_dir = value,
                    "s" => out.plugin_checksums = value,
                    "health-addr" => out.health_addr = Some(value),
                    "log-level" => out.log_level = Some(value),
                    _ => out.log_format = Some(value),
                }
            }
            "h" | "help" => return Err(FlagError::Help),
            _ => {
                return Err(FlagError::Usage(format!(
                    "flag provided but not defined: -{name}"
                )));
            }
        }
    }
    out.positional = args[i..].to_vec();
    Ok(out)
}

/// What a parsed Secretless invocation asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretlessAction {
    /// `-version`, or `version` after the flags: print the version.
    Version,
    Run(SecretlessRun),
}

/// `broker -f FILE`: run the daemon on FILE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretlessRun {
    pub file: PathBuf,
    /// `-log-level`, else `debug` for `-debug`, else `None` (`BROKER_LOG`, `info`).
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    /// `-health-addr` (`Some(None)`: `off`).
    pub health_addr: Option<Option<SocketAddr>>,
    /// `-watch`: reload when the file changes.
    pub watch: bool,
    /// Warnings to log once logging is up (accepted flags we do not act on).
    pub warnings: Vec<String>,
}

/// Where Secretless looks for its configuration without `-f`: `./secretless.yml`,
/// `~/.secretless.yml`, `/etc/secretless.yml`.
#[must_use]
pub fn secretless_default_files(home: Option<&Path>) -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from("./secretless.yml")];
    if let Some(h) = home {
        v.push(h.join(".secretless.yml"));
    }
    v.push(PathBuf::from("/etc/secretless.yml"));
    v
}

impl SecretlessArgs {
    /// Give every flag its meaning, or a clear error for what is not supported.
    ///
    /// # Errors
    /// An unsupported configuration manager (`k8s/crd`), `-profile`, a bad
    /// `-health-addr`, no configuration file, unexpected arguments.
    pub fn resolve(&self) -> Result<SecretlessAction, String> {
        if self.version || self.positional.first().is_some_and(|p| p == "version") {
            return Ok(SecretlessAction::Version);
        }
        if let Some(p) = self.positional.first() {
            return Err(format!(
                "unexpected argument `{p}`: the Secretless form takes flags only (broker -f FILE [flags]); subcommands come first (broker run -f FILE)"
            ));
        }
        if !self.profile.is_empty() {
            return Err(format!(
                "-profile {}: Go CPU/memory profiling is not supported (profile the broker process with perf or heaptrack instead)",
                self.profile
            ));
        }
        let (manager, spec) = match self.config_mgr.split_once('#') {
            Some((m, s)) => (m, s),
            None => (self.config_mgr.as_str(), ""),
        };
        let mut file = match manager {
            "configfile" if !spec.is_empty() => PathBuf::from(spec),
            "configfile" if !self.file.is_empty() => PathBuf::from(&self.file),
            "configfile" => {
                let home = std::env::var_os("HOME").map(PathBuf::from);
                let candidates = secretless_default_files(home.as_deref());
                candidates
                    .iter()
                    .find(|p| p.is_file())
                    .cloned()
                    .ok_or_else(|| {
                        format!(
                            "no configuration file: give one with -f FILE (none of {} exists)",
                            candidates
                                .iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })?
            }
            "k8s/crd" => {
                return Err(
                    "-config-mgr k8s/crd: Kubernetes CRD configuration (configurations.secretless.io objects) is not supported; put the configuration in a file (a ConfigMap mounted in the pod) and start with -f FILE".into(),
                );
            }
            other => {
                return Err(format!(
                    "-config-mgr {other}: configuration manager not supported (only configfile)"
                ));
            }
        };
        if file.as_os_str().is_empty() {
            file = PathBuf::from("./secretless.yml");
        }
        let health_addr = match &self.health_addr {
            None => None,
            Some(a) => Some(
                crate::config::parse_health_addr(a)
                    .map_err(|e| format!("invalid value {a:?} for flag -health-addr: {e}"))?,
            ),
        };
        let mut warnings = Vec::new();
        let plugins = go_plugins(Path::new(&self.plugin_dir));
        if !plugins.is_empty() {
            warnings.push(format!(
                "Secretless Go plugin connectors are not supported; not loading {} (a service using one is reported by its connector name)",
                plugins
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !self.plugin_checksums.is_empty() {
            warnings.push(format!(
                "-s {}: plugin checksums ignored (Go plugins are not loaded)",
                self.plugin_checksums
            ));
        }
        Ok(SecretlessAction::Run(SecretlessRun {
            file,
            log_level: self
                .log_level
                .clone()
                .or_else(|| self.debug.then(|| "debug".to_owned())),
            log_format: self.log_format.clone(),
            health_addr,
            watch: self.watch,
            warnings,
        }))
    }
}

/// The `*.so` files in a Secretless plugin directory (none if it does not exist).
fn go_plugins(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "so"))
        .take(64)
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn parse(args: &[&str]) -> Result<SecretlessArgs, FlagError> {
        parse_secretless(&os(args))
    }

    fn run(args: &[&str]) -> SecretlessRun {
        match parse(args).unwrap().resolve().unwrap() {
            SecretlessAction::Run(r) => r,
            SecretlessAction::Version => panic!("version"),
        }
    }

    #[test]
    fn which_form() {
        for yes in [
            &["-f", "x.yml"][..],
            &["--f", "x.yml"],
            &["-f=x.yml"],
            &["-debug", "-f", "x"],
            &["-version"],
            &["--log-level", "debug", "-f", "x"],
            &["--log-level=debug", "-f", "x"],
            &["-help"],
        ] {
            assert!(is_secretless_form(&os(yes)), "{yes:?}");
        }
        for no in [
            &[][..],
            &["run", "-f", "x"],
            &["check", "x"],
            &["--log-level", "debug", "run", "-f", "x"],
            &["--log-format=json", "exec", "-f", "x", "--", "true"],
            &["version"],
            &["-h"],
            &["--help"],
            &["-V"],
            &["--version"],
            &["frobnicate"],
            &["-"],
        ] {
            assert!(!is_secretless_form(&os(no)), "{no:?}");
        }
    }

    #[test]
    fn go_flag_syntax() {
        for args in [
            &["-f", "a.yml"][..],
            &["--f", "a.yml"],
            &["-f=a.yml"],
            &["--f=a.yml"],
        ] {
            assert_eq!(parse(args).unwrap().file, "a.yml", "{args:?}");
        }
        let a = parse(&["-debug", "-watch=true", "-graceful-exit", "-f", "x"]).unwrap();
        assert!(a.debug && a.watch && a.graceful_exit);
        assert!(!parse(&["-debug=false", "-f", "x"]).unwrap().debug);
        assert!(parse(&["-debug=0"]).is_ok());
        // A bool flag never takes the next word: `-debug false` leaves `false` positional.
        assert_eq!(parse(&["-debug", "false"]).unwrap().positional, ["false"]);
        // The last occurrence wins, as in Go.
        assert_eq!(parse(&["-f", "a", "-f", "b"]).unwrap().file, "b");
        // A value may start with a dash.
        assert_eq!(parse(&["-f", "-weird.yml"]).unwrap().file, "-weird.yml");
        assert_eq!(
            parse(&["-f", "x", "--", "-debug"]).unwrap().positional,
            ["-debug"]
        );
        assert_eq!(
            parse(&["-debug=maybe"]),
            Err(FlagError::Usage(
                "invalid boolean value \"maybe\" for -debug: parse error".into()
            ))
        );
        assert_eq!(
            parse(&["-f"]),
            Err(FlagError::Usage("flag needs an argument: -f".into()))
        );
        assert_eq!(
            parse(&["-nope"]),
            Err(FlagError::Usage(
                "flag provided but not defined: -nope".into()
            ))
        );
        assert_eq!(
            parse(&["---f", "x"]),
            Err(FlagError::Usage("bad flag syntax: ---f".into()))
        );
        assert_eq!(parse(&["-help"]), Err(FlagError::Help));
        assert_eq!(parse(&["-f", "x", "-h"]), Err(FlagError::Help));
    }

    #[test]
    fn meanings() {
        let r = run(&["-f", "/etc/secretless/secretless.yml"]);
        assert_eq!(r.file, Path::new("/etc/secretless/secretless.yml"));
        assert_eq!(r.log_level, None);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(
            run(&["-f", "x", "-debug"]).log_level.as_deref(),
            Some("debug")
        );
        assert_eq!(
            run(&["-f", "x", "-debug", "-log-level", "warn"])
                .log_level
                .as_deref(),
            Some("warn")
        );
        let r = run(&["-f", "x", "-watch"]);
        assert!(r.watch && r.warnings.is_empty(), "{r:?}");
        assert_eq!(
            run(&["-f", "x", "-config-mgr", "configfile"]).file,
            Path::new("x")
        );
        // configfile#PATH names the file, as in Secretless.
        assert_eq!(
            run(&["-f", "x", "-config-mgr", "configfile#/etc/s.yml"]).file,
            Path::new("/etc/s.yml")
        );
        assert_eq!(
            run(&["-f", "x", "-health-addr", "0.0.0.0:5335"]).health_addr,
            Some(Some("0.0.0.0:5335".parse().unwrap()))
        );
        assert_eq!(
            run(&["-f", "x", "--health-addr=off"]).health_addr,
            Some(None)
        );
        let e = parse(&["-f", "x", "-config-mgr", "k8s/crd"])
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(e.contains("k8s/crd") && e.contains("Kubernetes CRD"), "{e}");
        let e = parse(&["-config-mgr", "vault"])
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(e.contains("vault") && e.contains("not supported"), "{e}");
        let e = parse(&["-f", "x", "-profile", "cpu"])
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(e.contains("-profile") && e.contains("not supported"), "{e}");
        let e = parse(&["-f", "x", "-health-addr", "nowhere"])
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(e.contains("-health-addr"), "{e}");
        let e = parse(&["-f", "x", "run"]).unwrap().resolve().unwrap_err();
        assert!(e.contains("`run`"), "{e}");
        for v in [
            &["-version"][..],
            &["-f", "x", "version"],
            &["--version=true"],
        ] {
            assert_eq!(
                parse(v).unwrap().resolve(),
                Ok(SecretlessAction::Version),
                "{v:?}"
            );
        }
    }

    #[test]
    fn go_plugins_are_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("my-connector.so"), b"").unwrap();
        std::fs::write(d.path().join("README"), b"").unwrap();
        let dir = d.path().to_str().unwrap();
        let w = run(&["-f", "x", "-p", dir, "-s", "sums.txt"]).warnings;
        assert!(
            w.iter()
                .any(|w| w.contains("my-connector.so") && w.contains("not supported")),
            "{w:?}"
        );
        assert!(w.iter().any(|w| w.contains("-s sums.txt")), "{w:?}");
    }

    #[test]
    fn default_files_in_secretless_order() {
        assert_eq!(
            secretless_default_files(Some(Path::new("/home/u"))),
            [
                PathBuf::from("./secretless.yml"),
                PathBuf::from("/home/u/.secretless.yml"),
                PathBuf::from("/etc/secretless.yml")
            ]
        );
    }

    #[test]
    fn log_levels() {
        for ok in [
            "info",
            "DEBUG",
            "warn,access=info",
            "debug,hickory=warn,aya=warn",
            "info,broker::secrets=debug",
            "off",
        ] {
            assert!(log_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["verbose", "warning", "info,lots", "x=notalevel"] {
            assert!(log_filter(bad).is_err(), "{bad}");
        }
        let e = log_filter("verbose").unwrap_err();
        assert!(e.contains("`verbose`") && e.contains("trace, debug"), "{e}");
    }

    #[test]
    fn exec_separator_message() {
        let m = exec_without_separator(&os(&["exec", "-f", "b.yml", "psql", "-h", "db"])).unwrap();
        assert!(m.contains("after `--`") && m.contains("`psql`"), "{m}");
        let m =
            exec_without_separator(&os(&["--log-level", "debug", "exec", "-f", "b.yml"])).unwrap();
        assert!(m.contains("after `--`"), "{m}");
        assert_eq!(
            exec_without_separator(&os(&["exec", "-f", "b.yml", "--", "psql"])),
            None
        );
        assert_eq!(
            exec_without_separator(&os(&["run", "-f", "b.yml", "x"])),
            None
        );
    }
}
