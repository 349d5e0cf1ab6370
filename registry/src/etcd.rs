//! The etcd provider: reads the prefix with its revision, builds a table, then watches from
//! revision + 1. A batch of watch events (gathered for `debounce`) becomes one new table.
//! After a disconnect it retries with backoff and resumes from the last revision; after a
//! compaction it resyncs in full. While etcd is unreachable the last table keeps serving,
//! and the last good state is written atomically to a snapshot file that a restart during
//! an outage serves from.
use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use etcd_client::{EventType, GetOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::{etcd_keys::connect, Desired, EtcdSettings, EtcdView};

/// Counters and state for metrics and the admin API.
#[derive(Debug, Default)]
pub struct EtcdStats {
    pub connected: AtomicBool,
    /// Last etcd revision applied.
    pub revision: AtomicI64,
    pub full_syncs: AtomicU64,
    pub reconnects: AtomicU64,
    pub compactions: AtomicU64,
    pub events: AtomicU64,
    pub batches: AtomicU64,
    pub serving_snapshot: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

/// The provider; run it with [`EtcdProvider::run`] on a tokio runtime.
pub struct EtcdProvider {
    pub settings: EtcdSettings,
    pub desired: Arc<Desired>,
    pub stats: Arc<EtcdStats>,
    snapshot_due: Notify,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    prefix: String,
    revision: i64,
    entries: Vec<SnapshotEntry>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotEntry {
    key: String,
    value: String,
    create_revision: i64,
    lease: i64,
}

enum SessionEnd {
    Shutdown,
    /// Lost the connection; resume from the last revision.
    Disconnected(String),
    /// The watch start revision was compacted: read everything again.
    Compacted(i64),
}

impl EtcdProvider {
    pub fn new(settings: EtcdSettings, desired: Arc<Desired>) -> Arc<Self> {
        Arc::new(EtcdProvider {
            settings,
            desired,
            stats: Arc::new(EtcdStats::default()),
            snapshot_due: Notify::new(),
        })
    }

    /// Serves the snapshot file's state until etcd answers. Returns whether one was loaded.
    pub fn load_snapshot(&self) -> bool {
        let Some(path) = &self.settings.snapshot_file else {
            return false;
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(_) => return false,
        };
        let snap: Snapshot = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(file = %path.display(), "etcd snapshot unreadable ({e}); ignoring it");
                return false;
            }
        };
        if snap.prefix != self.settings.prefix {
            tracing::warn!(file = %path.display(), "etcd snapshot is for prefix {} not {}; ignoring it", snap.prefix, self.settings.prefix);
            return false;
        }
        let revision = snap.revision;
        let result = self.desired.update_etcd(|view| {
            *view = EtcdView {
                revision,
                from_snapshot: true,
                ..Default::default()
            };
            for e in snap.entries {
                view.put(&e.key, e.value, e.create_revision, e.lease);
            }
        });
        match result {
            Ok(rev) => {
                self.stats.serving_snapshot.store(true, Ordering::Relaxed);
                self.stats.revision.store(revision, Ordering::Relaxed);
                tracing::warn!(file = %path.display(), etcd_revision = revision, table = %rev,
                    "serving the last known etcd state from the snapshot until etcd answers");
                true
            }
            Err(e) => {
                tracing::error!(file = %path.display(), "etcd snapshot could not be applied: {e}");
                false
            }
        }
    }

    /// Runs until `shutdown` turns true: sync, watch, reconnect, resync.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let writer = tokio::spawn(self.clone().snapshot_writer());
        let mut resume_from: Option<i64> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let end = tokio::select! {
                end = self.session(&mut resume_from, &mut backoff) => end,
                _ = shutdown.changed() => SessionEnd::Shutdown,
            };
            let was_connected = self.stats.connected.swap(false, Ordering::Relaxed);
            match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Compacted(rev) => {
                    self.stats.compactions.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        compact_revision = rev,
                        "etcd history was compacted past our revision; reading everything again"
                    );
                    resume_from = None;
                    continue;
                }
                SessionEnd::Disconnected(why) => {
                    if was_connected {
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    *self
                        .stats
                        .last_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
                    tracing::warn!(endpoints = %self.settings.endpoints.join(","), retry_in = ?backoff,
                        "etcd unreachable ({why}); still serving the last route table");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        writer.abort();
    }

    async fn session(&self, resume_from: &mut Option<i64>, backoff: &mut Duration) -> SessionEnd {
        let prefix = self.settings.prefix.clone();
        let mut client = match connect(&self.settings).await {
            Ok(c) => c,
            Err(e) => return SessionEnd::Disconnected(e.to_string()),
        };
        if resume_from.is_none() {
            let resp = match client
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await
            {
                Ok(r) => r,
                Err(e) => return SessionEnd::Disconnected(e.to_string()),
            };
            let revision = resp.header().map_or(0, |h| h.revision());
            let mut fresh = EtcdView {
                revision,
                from_snapshot: false,
                ..Default::default()
            };
            for kv in resp.kvs() {
                let (Ok(key), Ok(value)) = (kv.key_str(), kv.value_str()) else {
                    continue;
                };
                if let Some(rest) = key.strip_prefix(prefix.as_str()) {
                    fresh.put(rest, value.to_string(), kv.create_revision(), kv.lease());
                }
            }
            let count = fresh.entries.len();
            match self.desired.update_etcd(|view| *view = fresh) {
                Ok(table) => {
                    tracing::info!(etcd_revision = revision, keys = count, table = %table, "etcd state loaded")
                }
                Err(e) => tracing::error!("etcd state could not be applied: {e}"),
            }
            self.stats.full_syncs.fetch_add(1, Ordering::Relaxed);
            self.stats.serving_snapshot.store(false, Ordering::Relaxed);
            self.stats.revision.store(revision, Ordering::Relaxed);
            *resume_from = Some(revision);
            self.snapshot_due.notify_one();
        }
        let start = resume_from.map_or(0, |r| r + 1);
        let mut stream = match client
            .watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(start)
                        .with_progress_notify(),
                ),
            )
            .await
        {
            Ok(s) => s,
            Err(e) => return SessionEnd::Disconnected(e.to_string()),
        };
        self.stats.connected.store(true, Ordering::Relaxed);
        *self
            .stats
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        *backoff = Duration::from_millis(100);
        loop {
            let first = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return SessionEnd::Disconnected("watch stream closed".into()),
                Err(e) => return SessionEnd::Disconnected(e.to_string()),
            };
            if first.compact_revision() > 0 {
                return SessionEnd::Compacted(first.compact_revision());
            }
            if first.canceled() {
                return SessionEnd::Disconnected(format!(
                    "watch canceled: {}",
                    first.cancel_reason()
                ));
            }
            // Gather what arrives within the debounce window into one change.
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + self.settings.debounce;
            while let Ok(next) = tokio::time::timeout_at(deadline, stream.message()).await {
                match next {
                    Ok(Some(m)) if m.compact_revision() > 0 => {
                        return SessionEnd::Compacted(m.compact_revision())
                    }
                    Ok(Some(m)) => batch.push(m),
                    Ok(None) => break,
                    Err(e) => {
                        // Apply what we have, then reconnect.
                        self.apply(&batch, &prefix, resume_from);
                        return SessionEnd::Disconnected(e.to_string());
                    }
                }
            }
            self.apply(&batch, &prefix, resume_from);
        }
    }

    fn apply(
        &self,
        batch: &[etcd_client::WatchResponse],
        prefix: &str,
        resume_from: &mut Option<i64>,
    ) {
        let events: usize = batch.iter().map(|m| m.events().len()).sum();
        let revision = batch
            .iter()
            .filter_map(|m| m.header().map(|h| h.revision()))
            .max()
            .unwrap_or_default();
        if events == 0 {
            // Progress notification: our revision is current.
            if revision > 0 {
                *resume_from = Some(revision.max(resume_from.unwrap_or(0)));
            }
            return;
        }
        let result = self.desired.update_etcd(|view| {
            view.from_snapshot = false;
            for m in batch {
                for ev in m.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Ok(key) = kv.key_str() else { continue };
                    let Some(rest) = key.strip_prefix(prefix) else {
                        continue;
                    };
                    match ev.event_type() {
                        EventType::Put => view.put(
                            rest,
                            kv.value_str().unwrap_or_default().to_string(),
                            kv.create_revision(),
                            kv.lease(),
                        ),
                        EventType::Delete => view.delete(rest),
                    }
                }
            }
            view.revision = view.revision.max(revision);
        });
        if let Err(e) = result {
            tracing::error!("etcd change could not be applied: {e}");
        }
        self.stats
            .events
            .fetch_add(events as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.revision.store(revision, Ordering::Relaxed);
        self.stats.serving_snapshot.store(false, Ordering::Relaxed);
        *resume_from = Some(revision.max(resume_from.unwrap_or(0)));
        self.snapshot_due.notify_one();
    }

    /// Writes the snapshot after changes, at most every 250 ms.
    async fn snapshot_writer(self: Arc<Self>) {
        let Some(path) = self.settings.snapshot_file.clone() else {
            return;
        };
        loop {
            self.snapshot_due.notified().await;
            tokio::time::sleep(Duration::from_millis(250)).await;
            let Some(view) = self.desired.etcd_view() else {
                continue;
            };
            if view.from_snapshot {
                continue;
            }
            let snap = Snapshot {
                prefix: self.settings.prefix.clone(),
                revision: view.revision,
                entries: view
                    .entries
                    .into_iter()
                    .map(|(key, e)| SnapshotEntry {
                        key,
                        value: e.value,
                        create_revision: e.create_revision,
                        lease: e.lease,
                    })
                    .collect(),
            };
            let path = path.clone();
            let written = tokio::task::spawn_blocking(move || write_atomically(&path, &snap)).await;
            if let Ok(Err(e)) = written {
                tracing::warn!("cannot write the etcd snapshot: {e}");
            }
        }
    }
}

fn write_atomically(path: &Path, snap: &Snapshot) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec(snap).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
