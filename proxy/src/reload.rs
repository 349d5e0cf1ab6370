//! Live reload of the file configuration: on SIGHUP or when the configuration file or the
//! manifests directory changes, validate everything, compile a new table and swap it in.
//! An invalid change is refused with its reasons logged; the running table keeps serving.
//! Requests in flight finish on the table they started with.
use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::Duration,
};

use notify::{RecursiveMode, Watcher};
use space_registry::{load_config, Config, Desired};

/// Counts and the last refusal, for metrics and the admin API.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub applied: AtomicU64,
    pub refused: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ReloadStats {
    /// Counts a reload and remembers why it was refused (`None`: applied).
    fn record(&self, refused: Option<&str>) {
        let counter = if refused.is_some() {
            &self.refused
        } else {
            &self.applied
        };
        counter.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = refused.map(str::to_string);
    }

    /// Why the last reload was refused, unless one was applied since.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Re-reads the configuration and hands it to the desired state, which publishes.
pub struct Reloader {
    pub config_path: PathBuf,
    pub desired: Arc<Desired>,
    pub stats: Arc<ReloadStats>,
    /// The settings SPACE started with: changes to them need a restart, which is logged.
    pub started_with: Config,
}

impl Reloader {
    /// Reloads now. Returns the new revision, or the reasons the change was refused.
    pub fn reload(&self, trigger: &str) -> Result<String, String> {
        let result = load_config(&self.config_path)
            .map_err(|e| e.to_string())
            .and_then(|config| {
                let unchanged = self.desired.file_revision().as_deref() == Some(&config.revision);
                if unchanged {
                    return Ok(None);
                }
                self.warn_restart_only_changes(&config);
                self.desired.set_file(config).map(Some)
            });
        match result {
            Ok(None) => Ok(self.desired.routes().load().revision().to_string()),
            Ok(Some(revision)) => {
                let table = self.desired.routes().load();
                self.stats.record(None);
                tracing::info!(trigger, revision = %revision, modules = table.modules().len(), instances = table.instance_count(), "configuration reloaded");
                Ok(revision)
            }
            Err(why) => {
                self.stats.record(Some(&why));
                tracing::error!(trigger, revision = %self.desired.routes().load().revision(),
                    "configuration change refused; still serving the previous route table:\n  {why}");
                Err(why)
            }
        }
    }

    fn warn_restart_only_changes(&self, new: &Config) {
        let old = &self.started_with;
        if old.listeners != new.listeners || old.server != new.server || old.tls != new.tls {
            tracing::warn!("[server], [listeners] and [tls] changes take effect after a restart; routes were reloaded");
        }
    }

    /// Watches the configuration file's directory and the manifests directory; reloads
    /// (debounced) on change, and on SIGHUP. Runs on its own threads for the process's life.
    pub fn spawn(self: Arc<Self>) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel::<&'static str>();
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
        let hup_tx = tx.clone();
        std::thread::Builder::new()
            .name("space-sighup".into())
            .spawn(move || {
                for _ in signals.forever() {
                    let _ = hup_tx.send("SIGHUP");
                }
            })?;

        let watched: Vec<PathBuf> = std::iter::once(self.config_path.clone())
            .chain(self.started_with.manifests_dir.clone())
            .collect();
        let config_dir = self
            .config_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let file_tx = tx.clone();
        let relevant = watched.clone();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                let touches = ev.paths.iter().any(|p| {
                    relevant.iter().any(|w| p == w || p.starts_with(w))
                        || p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("..data"))
                });
                if touches && !matches!(ev.kind, notify::EventKind::Access(_)) {
                    let _ = file_tx.send("file change");
                }
            }
        })?;
        watcher.watch(&config_dir, RecursiveMode::NonRecursive)?;
        if let Some(dir) = &self.started_with.manifests_dir {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), "cannot watch the manifests directory ({e}); use SIGHUP to reload");
            }
        }
        std::thread::Builder::new()
            .name("space-reload".into())
            .spawn(move || {
                let _watcher = watcher; // lives as long as this thread
                while let Ok(trigger) = rx.recv() {
                    // Debounce: editors write files in several steps.
                    std::thread::sleep(Duration::from_millis(150));
                    while rx.try_recv().is_ok() {}
                    let _ = self.reload(trigger);
                }
            })?;
        Ok(())
    }
}
