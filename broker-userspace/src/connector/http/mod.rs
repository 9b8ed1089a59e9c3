//! HTTP and HTTPS: per-request credential injection (Secretless `generic_http`,
//! `basic_auth`, `conjur`, `aws`; the `authentication: [{type: oauth2}]` block).
//!
//! Being built (issue 11). The pieces, each with its own tests:
//! * [`template`]: the Go-template subset Secretless users write in `headers` and
//!   `queryParams` (`{{ .token }}`, `{{ printf "%s:%s" .username .password | base64 }}`);
//! * [`oauth2`]: OAuth2 client-credentials tokens, fetched once for all concurrent
//!   requests and cached until shortly before they expire;
//! * [`sigv4`]: AWS Signature Version 4, re-signing each request with brokered keys.

pub mod oauth2;
pub mod sigv4;
pub mod template;
