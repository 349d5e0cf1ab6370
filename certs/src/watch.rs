//! Watching the certificate directory: a recursive notify watcher (which sees the
//! kubelet's `..data` symlink swap, as that happens inside the watched tree), debounced,
//! plus a periodic rescan as a fallback. Both only reload when the directory contents
//! hash differs from what the served certificates were built from. Runs on one
//! background thread that stops when the [`CertWatch`] handle is dropped.

use std::{
    fmt,
    sync::mpsc::{self, RecvTimeoutError},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use notify::{event::ModifyKind, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::{load::read_dir_state, CertError, CertStore};

/// Quiet time after the last file event before rescanning (the kubelet writes a
/// secret update as several events).
const DEBOUNCE: Duration = Duration::from_millis(200);
/// Longest a burst of events can delay a rescan.
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);

/// A running watcher. Dropping it stops the watcher and joins its thread.
pub struct CertWatch {
    tx: mpsc::Sender<Msg>,
    watcher: Option<RecommendedWatcher>,
    thread: Option<JoinHandle<()>>,
}

enum Msg {
    Fs(notify::Result<notify::Event>),
    Stop,
}

impl CertWatch {
    /// True if file events are watched; false if only the periodic rescan runs.
    pub fn is_notify_active(&self) -> bool {
        self.watcher.is_some()
    }
}

impl fmt::Debug for CertWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertWatch")
            .field("notify", &self.watcher.is_some())
            .finish()
    }
}

impl Drop for CertWatch {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        drop(self.watcher.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl CertStore {
    /// Starts watching the directory (recursive; follows the Kubernetes `..data`
    /// symlink swap) with a ~200 ms debounce, calling [`CertStore::reload`] on change,
    /// plus a rescan every `poll` as a fallback (`Duration::ZERO` = no periodic
    /// rescan). Both compare a hash of the files' contents, so an unchanged directory
    /// causes no reload and no log line. If file events cannot be watched (e.g. the
    /// inotify limit is reached) it logs a warning and relies on the periodic rescan.
    /// The watcher stops when the returned handle is dropped.
    pub fn watch(&self, poll: Duration) -> Result<CertWatch, CertError> {
        start(self, poll, true)
    }

    /// Like [`CertStore::watch`] but without file events: only the periodic rescan
    /// (for file systems without change notification, such as some network mounts).
    pub fn watch_polling(&self, poll: Duration) -> Result<CertWatch, CertError> {
        start(self, poll, false)
    }
}

fn start(store: &CertStore, poll: Duration, use_notify: bool) -> Result<CertWatch, CertError> {
    let dir = store.dir().to_path_buf();
    std::fs::read_dir(&dir).map_err(|source| CertError::ReadDir {
        dir: dir.clone(),
        source,
    })?;
    let (tx, rx) = mpsc::channel();
    let watcher = if use_notify {
        let events = tx.clone();
        let started = notify::recommended_watcher(move |event| {
            let _ = events.send(Msg::Fs(event));
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::Recursive).map(|()| w));
        match started {
            Ok(w) => Some(w),
            Err(e) if !poll.is_zero() => {
                tracing::warn!(dir = %dir.display(), error = %e, poll = ?poll, "cannot watch TLS certificate directory for file events; relying on the periodic rescan");
                None
            }
            Err(e) => {
                return Err(CertError::Watch {
                    dir,
                    reason: e.to_string(),
                    fix: "raise fs.inotify.max_user_watches / max_user_instances, or give a non-zero poll interval",
                })
            }
        }
    } else if poll.is_zero() {
        return Err(CertError::Watch {
            dir,
            reason: "polling with a zero interval".to_owned(),
            fix: "give a non-zero poll interval",
        });
    } else {
        None
    };

    let thread_store = store.clone();
    let thread = thread::Builder::new()
        .name("space-certs-watch".to_owned())
        .spawn(move || run(&thread_store, &rx, poll))
        .map_err(|e| CertError::Watch {
            dir: dir.clone(),
            reason: format!("cannot start watcher thread: {e}"),
            fix: "check the process thread limit",
        })?;
    tracing::info!(dir = %dir.display(), notify = watcher.is_some(), poll = ?poll, "watching TLS certificate directory");
    Ok(CertWatch {
        tx,
        watcher,
        thread: Some(thread),
    })
}

fn run(store: &CertStore, rx: &mpsc::Receiver<Msg>, poll: Duration) {
    let poll = (!poll.is_zero()).then_some(poll);
    let mut next_poll = poll.map(|p| Instant::now() + p);
    loop {
        let wait = next_poll
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        match rx.recv_timeout(wait) {
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Msg::Fs(event)) => {
                if !relevant(store, &event) {
                    continue;
                }
                if !debounce(rx) {
                    return;
                }
                rescan(store, "file change");
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Some(p) = poll {
                    rescan(store, "periodic rescan");
                    next_poll = Some(Instant::now() + p);
                }
            }
        }
    }
}

/// Reads (access) do not count: our own rescans would trigger themselves.
fn relevant(store: &CertStore, event: &notify::Result<notify::Event>) -> bool {
    match event {
        Ok(ev) => !matches!(
            ev.kind,
            EventKind::Access(_)
                | EventKind::Modify(ModifyKind::Metadata(
                    notify::event::MetadataKind::AccessTime
                ))
        ),
        Err(e) => {
            tracing::warn!(dir = %store.dir().display(), error = %e, "TLS certificate watcher error; rescanning");
            true
        }
    }
}

/// Waits until no event came for `DEBOUNCE` (at most `MAX_DEBOUNCE`). False = stop.
fn debounce(rx: &mpsc::Receiver<Msg>) -> bool {
    let start = Instant::now();
    loop {
        let left = MAX_DEBOUNCE.saturating_sub(start.elapsed());
        if left.is_zero() {
            return true;
        }
        match rx.recv_timeout(DEBOUNCE.min(left)) {
            Ok(Msg::Fs(_)) => {}
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return false,
            Err(RecvTimeoutError::Timeout) => return true,
        }
    }
}

fn rescan(store: &CertStore, trigger: &'static str) {
    let state = read_dir_state(store.dir());
    if state.fingerprint == store.fingerprint() {
        tracing::trace!(dir = %store.dir().display(), trigger, "TLS certificate directory unchanged");
        return;
    }
    tracing::debug!(dir = %store.dir().display(), trigger, "TLS certificate directory changed; reloading");
    store.reload();
}
