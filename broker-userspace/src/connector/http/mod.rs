//! HTTP and HTTPS: per-request credential injection (Secretless `generic_http`,
//! `basic_auth`, `conjur`, `aws`; the `authentication: [{type: oauth2}]` block).
//!
//! The pieces:
//! * [`config`]: the kinds' `config:` blocks (`headers`, `queryParams`,
//!   `authenticateURLsMatching`, `forceSSL`, `upstream`...);
//! * [`serve`]: one client connection: hyper on both legs, TLS terminated for
//!   intercepted names (a local-CA leaf) or passed through untouched ([`sni`]);
//! * [`inject`]: what an authenticated request gets (templates, basic auth, query);
//! * [`template`]: the Go-template subset Secretless users write in `headers` and
//!   `queryParams` (`{{ .token }}`, `{{ printf "%s:%s" .username .password | base64 }}`);
//! * [`oauth1`]: OAuth 1.0a request signing (HMAC-SHA1), Secretless' `oauth1:` block;
//! * [`oauth2`]: OAuth2 client-credentials tokens, fetched once for all concurrent
//!   requests and cached until shortly before they expire ([`tokens`]: the seam);
//! * [`sigv4`]: AWS Signature Version 4, re-signing each request with brokered keys;
//! * [`deny`]: a connection the policy refused: `403` with a JSON body naming the rule.

pub mod config;
pub mod deny;
pub mod inject;
pub mod oauth1;
pub mod oauth2;
pub mod serve;
pub mod sigv4;
pub mod sni;
pub mod template;
pub mod tokens;

use std::sync::Arc;

use crate::{config::ConnectorSyntax, connector::Kind};

/// `generic_http` (alias `http`): headers and query parameters from templates.
pub const GENERIC_KIND: Kind = Kind {
    syntax: ConnectorSyntax {
        names: &["generic_http", "http"],
        required_credentials: &[],
        upstream_credentials: &[],
        shares_listener: true,
        parse: config::parse_generic,
    },
    build: |service| Ok(Arc::new(serve::HttpConnector::new(service)?)),
};

/// `basic_auth`: `Authorization: Basic base64(username:password)`.
pub const BASIC_KIND: Kind = Kind {
    syntax: ConnectorSyntax {
        names: &["basic_auth"],
        required_credentials: &["username", "password"],
        upstream_credentials: &[],
        shares_listener: true,
        parse: config::parse_basic,
    },
    build: |service| Ok(Arc::new(serve::HttpConnector::new(service)?)),
};

/// `conjur`: Secretless' Conjur connector, `Authorization: Token token="base64(accessToken)"`
/// (a Conjur access token, fetched by the secret store like any credential).
pub const CONJUR_KIND: Kind = Kind {
    syntax: ConnectorSyntax {
        names: &["conjur"],
        required_credentials: &["accessToken"],
        upstream_credentials: &[],
        shares_listener: true,
        parse: config::parse_conjur,
    },
    build: |service| Ok(Arc::new(serve::HttpConnector::new(service)?)),
};

/// `aws`: each request re-signed with SigV4 from `accessKeyId`, `secretAccessKey` and the
/// optional `accessToken` (session token).
pub const AWS_KIND: Kind = Kind {
    syntax: ConnectorSyntax {
        names: &["aws"],
        required_credentials: &["accessKeyId", "secretAccessKey"],
        upstream_credentials: &[],
        shares_listener: true,
        parse: config::parse_aws,
    },
    build: |service| Ok(Arc::new(serve::HttpConnector::new(service)?)),
};
