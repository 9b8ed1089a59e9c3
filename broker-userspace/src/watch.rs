//! `-watch`: reload when the configuration file changes.
//!
//! The file's **directory** is watched (inotify, through `notify`), not the file: editors
//! replace a file by renaming a new one over it, and a Kubernetes ConfigMap volume swaps
//! a `..data` symlink, so a watch on the file itself would see nothing after the first
//! change. An event naming the file (or a `..data`-style entry of a ConfigMap volume)
//! compares the file's content with what was last applied (a SHA-256 of it), so only a
//! real change asks for a reload; bursts (an editor's write, chmod, rename) are coalesced
//! for [`SETTLE`]. Other files in the directory (a log written next to it) are ignored.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Quiet time after the last event before the file is compared.
pub const SETTLE: Duration = Duration::from_millis(300);

/// A running watch; dropping it stops it.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FileWatch {
    /// Watch `file`; `changed` gets one message per change of its content (a full
    /// channel drops extra ones: one reload reads the newest file anyway).
    ///
    /// # Errors
    /// When the directory cannot be watched.
    pub fn start(file: &Path, changed: mpsc::Sender<()>) -> anyhow::Result<Self> {
        let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        let dir = file
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let name = file.file_name().map(std::ffi::OsStr::to_os_string);
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            match ev {
                // Only the file itself, and a ConfigMap volume's `..data` swaps: other
                // files there (a log written next to it) must not keep the watch busy.
                Ok(ev)
                    if ev.paths.iter().any(|p| {
                        let n = p.file_name();
                        n == name.as_deref()
                            || n.is_some_and(|n| n.to_string_lossy().starts_with(".."))
                    }) =>
                {
                    let _ = tx.try_send(());
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "configuration file watch"),
            }
        })
        .context("starting the file watch")?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        tracing::info!(file = %file.display(), "watching the configuration file (-watch)");
        let mut last = digest(&file);
        let task = tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // Coalesce a burst.
                loop {
                    match tokio::time::timeout(SETTLE, rx.recv()).await {
                        Ok(Some(())) => {}
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let now = digest(&file);
                if now.is_some() && now != last {
                    last = now;
                    let _ = changed.try_send(());
                }
            }
        });
        Ok(Self {
            _watcher: watcher,
            task,
        })
    }
}

/// The SHA-256 of the file's content (`None` while it cannot be read, e.g. mid-swap).
fn digest(file: &Path) -> Option<[u8; 32]> {
    use sha2::Sha256;
    let bytes = std::fs::read(file).ok()?;
    Some(<Sha256 as sha2::Digest>::digest(&bytes).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_content_is_reported_once_and_a_touch_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("broker.yaml");
        std::fs::write(&f, "a").unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let _w = FileWatch::start(&f, tx).unwrap();
        // Same content rewritten: no reload.
        std::fs::write(&f, "a").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), rx.recv())
                .await
                .is_err()
        );
        // Replaced by a rename (as editors and ConfigMap volumes do): one reload.
        let tmp = dir.path().join(".broker.yaml.tmp");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &f).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a change is reported")
            .unwrap();
    }
}
