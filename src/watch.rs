//! Debounced watching of the configuration directory. Events only say
//! "look again": the daemon rescans and compares content hashes, because
//! editors' write-and-rename, `git checkout` and Kubernetes `..data` swaps
//! produce every kind of event and inotify can miss some.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc::UnboundedSender;

/// Events closer together than this end in one rescan.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

pub struct ConfigWatcher {
    debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    dir: PathBuf,
}

/// The directory to watch for `--config`: itself, or a file's directory.
/// A file is not watched directly: an editor's save replaces it and the
/// watch would go silent.
pub fn watched_dir(config: &Path) -> PathBuf {
    if config.is_dir() {
        config.to_path_buf()
    } else {
        config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
    }
}

impl ConfigWatcher {
    /// Starts watching; every debounced burst of events that may change
    /// something sends one message: `true` when the directory itself was
    /// created or removed, so its watch must be set up again.
    pub fn start(config: &Path, changed: UnboundedSender<bool>) -> notify::Result<ConfigWatcher> {
        let dir = watched_dir(config);
        let watched = dir.clone();
        let handler = move |result: DebounceEventResult| {
            let events = match result {
                Ok(events) => events,
                // Errors (a queue overflow, say) may hide changes: rescan.
                Err(_) => {
                    let _ = changed.send(true);
                    return;
                }
            };
            // Reading the files (as every rescan does) reports access events:
            // reacting to them would rescan forever.
            let relevant: Vec<_> = events.iter().filter(|e| !matches!(e.kind, EventKind::Access(_))).collect();
            if relevant.is_empty() {
                return;
            }
            let rewatch = relevant
                .iter()
                .any(|e| matches!(e.kind, EventKind::Create(_) | EventKind::Remove(_)) && e.paths.contains(&watched));
            let _ = changed.send(rewatch);
        };
        // Checked once per debounce period, not four times: an idle daemon
        // wakes for it 5 times a second, and a change is applied within
        // two periods.
        let debouncer = new_debouncer(DEBOUNCE, Some(DEBOUNCE), handler)?;
        let mut watcher = ConfigWatcher { debouncer, dir };
        // The parent shows the directory itself being deleted and recreated.
        if let Some(parent) = watcher.dir.parent().filter(|p| !p.as_os_str().is_empty())
            && let Err(e) = watcher.debouncer.watch(parent, RecursiveMode::NonRecursive)
        {
            tracing::warn!(dir = %parent.display(), error = %e, "cannot watch the configuration's parent directory");
        }
        watcher.ensure();
        Ok(watcher)
    }

    /// (Re)establishes the watch on the directory: after it was deleted and
    /// recreated, the old watch is gone.
    pub fn ensure(&mut self) {
        // No unwatch first: removing a live watch reports an event for the
        // directory, which would ask for another re-watch.
        if let Err(e) = self.debouncer.watch(&self.dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the configuration directory; rescanning periodically");
        }
    }
}
