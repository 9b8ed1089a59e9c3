//! What the loader knows about connector kinds: only what each kind declares in its own
//! module (names, credentials, how its `config:` block parses). The list of kinds is
//! handed in by the caller (`crate::connector::KINDS`), so this module never imports a
//! connector.

use std::{collections::BTreeSet, sync::Arc};

use yaml_serde::Value;

use super::{AuthMethod, ConnectorSettings, InterceptTarget, Loader};

/// How one connector kind reads its part of a service.
#[derive(Clone, Copy)]
pub struct ConnectorSyntax {
    /// The names a service may give in `connector:`; the first is the canonical one.
    pub names: &'static [&'static str],
    /// Credentials every service of this kind must have.
    pub required_credentials: &'static [&'static str],
    /// The credentials that can name the upstream (`host`; PostgreSQL also Secretless'
    /// `address`): one is required unless the service intercepts (the app's destination
    /// is then the default). Empty: the kind finds its upstream otherwise.
    pub upstream_credentials: &'static [&'static str],
    /// Several services of such kinds may share one `listenOn` address (Secretless'
    /// HTTP forward proxy: each request goes to the service whose
    /// `authenticateURLsMatching` matches its URL).
    pub shares_listener: bool,
    /// Parse and validate the `config:` block (`None` on error, errors recorded with
    /// their key paths in the [`Loader`]).
    pub parse: ParseFn,
}

/// See [`ConnectorSyntax::parse`].
pub type ParseFn = fn(&mut Loader<'_>, &ConnectorBlock<'_>) -> Option<Arc<dyn ConnectorSettings>>;

impl ConnectorSyntax {
    /// The canonical name.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        self.names[0]
    }
}

/// A connector kind: its syntax, and how the daemon builds it (`B`, opaque here).
pub struct ConnectorKind<B> {
    pub syntax: ConnectorSyntax,
    pub build: B,
}

/// Every connector kind a loader accepts.
pub struct ConnectorKinds<B: 'static> {
    pub built: &'static [ConnectorKind<B>],
    /// Names that are recognized but not built yet: a service may name them (loading
    /// succeeds; `broker check` and `broker run` report them).
    pub not_built: &'static [&'static str],
}

impl<B> ConnectorKinds<B> {
    /// The kind called `name` (any of its names).
    #[must_use]
    pub fn find(&self, name: &str) -> Option<&ConnectorKind<B>> {
        self.built.iter().find(|k| k.syntax.names.contains(&name))
    }

    /// The syntax part of every built kind, for the loader.
    pub(super) fn syntaxes(&self) -> Vec<ConnectorSyntax> {
        self.built.iter().map(|k| k.syntax).collect()
    }
}

/// What a kind's parser sees of the service it is parsing.
pub struct ConnectorBlock<'a> {
    /// The key path of the `config:` block (`services.db.config`).
    pub path: &'a str,
    /// The key path of the service (`services.db`, `services[0]`).
    pub service_path: &'a str,
    /// The connector name as written (`postgres`), for messages.
    pub name: &'a str,
    /// The `config:` block; `None` when absent or null.
    pub value: Option<&'a Value>,
    /// The service's validated intercept targets.
    pub intercept: &'a [InterceptTarget],
    /// The names of the credentials the service gives (valid or not).
    pub credentials: &'a BTreeSet<String>,
    /// The service's valid `authentication:` entries, each with the key path of its
    /// `config:` block (`services.api.authentication[0].config`), for a kind that checks
    /// them further.
    pub authentication: &'a [(String, AuthMethod)],
}
