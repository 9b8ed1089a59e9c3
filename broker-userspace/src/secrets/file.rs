//! `file`: the id is a file path; the value is the file's bytes with ONE trailing
//! `"\n"` or `"\r\n"` removed (files written by editors and `echo` end with one).
//! Relative paths are relative to the broker's working directory. The file is read at
//! each fetch, so a rotated file is picked up once the cache entry expires.

use super::{BoxFuture, Fetched, SecretError, SecretProvider};
use crate::secret::Secret;

pub struct FileProvider {
    name: String,
}

impl FileProvider {
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }
}

/// Remove one trailing `"\n"` or `"\r\n"`, in place.
pub(crate) fn trim_one_newline(bytes: &mut Vec<u8>) {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
}

impl SecretProvider for FileProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Fetched, SecretError>> {
        Box::pin(async move {
            match tokio::fs::read(id).await {
                Ok(bytes) => {
                    // Wrap first so the bytes are zeroed on drop whatever happens next.
                    let mut bytes = zeroize::Zeroizing::new(bytes);
                    trim_one_newline(&mut bytes);
                    Ok(Fetched::new(Secret::new(std::mem::take(&mut *bytes))))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SecretError::NotFound {
                    provider: self.name.clone(),
                    id: id.to_owned(),
                }),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    Err(SecretError::Denied {
                        provider: self.name.clone(),
                        id: id.to_owned(),
                        reason: e.to_string(),
                    })
                }
                Err(e) => Err(SecretError::Unreachable {
                    provider: self.name.clone(),
                    id: id.to_owned(),
                    reason: e.to_string(),
                }),
            }
        })
    }
}
