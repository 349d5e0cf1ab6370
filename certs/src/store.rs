//! The certificate store: the loaded pairs as one immutable snapshot behind an
//! `ArcSwap`, the rustls resolver that reads it lock-free on every handshake, strict
//! loading at startup, per-pair reload that never drops a working certificate, the
//! summary for the admin API, and the reload counters.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use arc_swap::ArcSwap;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde::Serialize;

use crate::{
    index::{IndexEntry, SniIndex},
    load::{content_hash, parse_pair, read_dir_state, DirState, Layout, LoadedPair},
    time, CertError,
};

/// The TLS certificates of one directory, chosen by SNI. Cheap to clone (shared inner).
#[derive(Clone)]
pub struct CertStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    default_name: Option<String>,
    current: Arc<ArcSwap<Snapshot>>,
    resolver: Arc<SniResolver>,
    /// Serializes reloads (watcher, admin API, signal) so each sees the one before.
    reload_lock: Mutex<()>,
    reloads_ok: AtomicU64,
    reloads_refused: AtomicU64,
    pairs_refused: AtomicU64,
}

/// One immutable view of the store; replaced whole on reload.
struct Snapshot {
    entries: BTreeMap<String, Entry>,
    index: SniIndex<Arc<CertifiedKey>>,
    default: Option<String>,
    /// Hash of the directory contents this snapshot was built from.
    fingerprint: [u8; 32],
}

#[derive(Clone)]
struct Entry {
    pair: Arc<LoadedPair>,
    /// Set while the files on disk are refused and this previous certificate serves on.
    last_error: Option<String>,
}

impl Snapshot {
    fn new(
        entries: BTreeMap<String, Entry>,
        default_name: Option<&str>,
        fingerprint: [u8; 32],
    ) -> Self {
        let default = match default_name {
            Some(name) if entries.contains_key(name) => Some(name.to_owned()),
            _ => entries.keys().next().cloned(),
        };
        let index = SniIndex::build(
            entries.values().map(|e| IndexEntry {
                names: &e.pair.dns_names,
                not_after: e.pair.not_after,
                value: e.pair.key.clone(),
            }),
            default
                .as_ref()
                .and_then(|d| entries.get(d))
                .map(|e| e.pair.key.clone()),
        );
        Snapshot {
            entries,
            index,
            default,
            fingerprint,
        }
    }
}

/// The rustls resolver handed to pingora: one `ArcSwap` load per handshake.
struct SniResolver {
    current: Arc<ArcSwap<Snapshot>>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = self.current.load();
        f.debug_struct("SniResolver")
            .field("pairs", &snap.entries.keys().collect::<Vec<_>>())
            .field("default", &snap.default)
            .finish()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .load()
            .index
            .lookup(client_hello.server_name())
            .cloned()
    }
}

/// One loaded pair, as shown by the admin API and logs.
#[derive(Debug, Clone, Serialize)]
pub struct CertSummary {
    /// Pair name: the file stem (`ehr` for `ehr.crt`) or the secret folder name.
    pub name: String,
    #[serde(serialize_with = "lossy_path")]
    pub cert_path: PathBuf,
    #[serde(serialize_with = "lossy_path")]
    pub key_path: PathBuf,
    pub layout: Layout,
    /// SAN DNS names of the leaf, lowercased (the CN if it has none); used for SNI.
    pub dns_names: Vec<String>,
    /// SAN IP addresses of the leaf (not used for SNI).
    pub ip_addresses: Vec<String>,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// `not_after` as RFC 3339 UTC, e.g. `2026-03-01T12:00:00Z`.
    pub not_after_rfc3339: String,
    pub expired: bool,
    /// SHA-256 of the leaf certificate (DER), lowercase hex.
    pub sha256: String,
    /// Certificates sent to clients: leaf plus chain.
    pub chain_len: usize,
    /// Served to clients without SNI or with an unknown name.
    pub is_default: bool,
    /// Set when the files on disk were refused at the last reload and this, the
    /// previously loaded certificate, is still being served.
    pub last_error: Option<String>,
}

fn lossy_path<S: serde::Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}

/// Reload counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CertStats {
    /// Reloads that refused nothing.
    pub reloads_ok: u64,
    /// Reloads that refused at least one pair (or the whole directory).
    pub reloads_refused: u64,
    /// Pairs refused, summed over all reloads.
    pub pairs_refused: u64,
    /// Pairs currently loaded (served).
    pub certificates: u64,
}

/// What one reload changed and refused.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// New pairs now served.
    pub added: Vec<String>,
    /// Pairs whose files changed and now serve the new certificate.
    pub updated: Vec<String>,
    /// Pairs whose files are gone; no longer served.
    pub removed: Vec<String>,
    /// Pairs whose files did not change.
    pub unchanged: Vec<String>,
    /// Pairs (or the whole directory, `name: None`) that failed to load.
    pub refused: Vec<Refusal>,
    /// Non-fatal problems: expired or not-yet-valid certificates that were loaded,
    /// a configured default that is missing.
    pub warnings: Vec<CertError>,
    /// The default pair after the reload.
    pub default: Option<String>,
}

/// A pair that failed to load during a reload.
#[derive(Debug)]
pub struct Refusal {
    /// Pair name; `None` when the whole directory was refused.
    pub name: Option<String>,
    /// The previously loaded certificate for this name keeps being served.
    pub kept_previous: bool,
    pub error: CertError,
}

impl ReloadReport {
    /// True if the set of served certificates changed.
    pub fn changed(&self) -> bool {
        !(self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty())
    }

    /// True if nothing was refused.
    pub fn is_ok(&self) -> bool {
        self.refused.is_empty()
    }
}

enum Parsed {
    Unchanged(Arc<LoadedPair>),
    New(LoadedPair),
}

impl CertStore {
    /// Loads every pair in `dir`. Startup is strict: returns `Err` listing every bad
    /// pair (file path + reason + fix) if any pair is bad, or if the directory holds
    /// no pair at all. Expired certificates load (with a warning log).
    ///
    /// `default_name` is the pair served without SNI or for unknown names; `None`
    /// means the first pair by name.
    pub fn load_dir(dir: &Path, default_name: Option<&str>) -> Result<CertStore, CertError> {
        let state = read_dir_state(dir);
        let fingerprint = state.fingerprint;
        let checked = check(state)?;
        let mut problems: Vec<CertError> = checked.problems.into_iter().map(|(_, e)| e).collect();
        if let Some(name) = default_name {
            if !checked.names.contains(name) {
                problems.push(default_not_found(dir, name, &checked.names));
            }
        }
        if !problems.is_empty() {
            return Err(CertError::Invalid {
                dir: dir.to_path_buf(),
                problems,
            });
        }
        if checked.loaded.is_empty() {
            return Err(CertError::NoPairs {
                dir: dir.to_path_buf(),
            });
        }
        let now = time::now_unix();
        let mut entries = BTreeMap::new();
        for pair in checked.loaded {
            if let Some(problem) = pair.validity_problem(now) {
                tracing::warn!(dir = %dir.display(), pair = %pair.spec.name, file = %pair.spec.cert.display(), error = %problem, "TLS certificate loaded but not currently valid");
            }
            entries.insert(
                pair.spec.name.clone(),
                Entry {
                    pair: Arc::new(pair),
                    last_error: None,
                },
            );
        }
        let snapshot = Snapshot::new(entries, default_name, fingerprint);
        tracing::info!(
            dir = %dir.display(),
            default = snapshot.default.as_deref().unwrap_or(""),
            certificates = %describe(&snapshot),
            "TLS certificates loaded"
        );
        let current = Arc::new(ArcSwap::from_pointee(snapshot));
        Ok(CertStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                default_name: default_name.map(str::to_owned),
                resolver: Arc::new(SniResolver {
                    current: current.clone(),
                }),
                current,
                reload_lock: Mutex::new(()),
                reloads_ok: AtomicU64::new(0),
                reloads_refused: AtomicU64::new(0),
                pairs_refused: AtomicU64::new(0),
            }),
        })
    }

    /// The rustls resolver to hand to pingora (`TlsSettings::set_cert_resolver`).
    /// Lock-free on the handshake path (one `ArcSwap` load); it follows every reload.
    pub fn resolver(&self) -> Arc<dyn ResolvesServerCert> {
        self.inner.resolver.clone()
    }

    /// The directory this store loads from.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Rescans the directory. A pair that fails to load keeps its previously loaded
    /// certificate (if any) and is reported; new good pairs are added; pairs whose
    /// files were removed are dropped — except that a rescan finding no pair at all
    /// (or an unreadable directory) keeps everything, so the listener never ends up
    /// with no certificate. Logs the result (info on change, warn per refusal).
    pub fn reload(&self) -> ReloadReport {
        let _serial = self
            .inner
            .reload_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = self.inner.current.load_full();
        let state = read_dir_state(&self.inner.dir);
        let (snapshot, report) = self.rebuild(&old, state);
        self.inner.current.store(Arc::new(snapshot));

        let refused = report.refused.len() as u64;
        if refused == 0 {
            self.inner.reloads_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.inner.reloads_refused.fetch_add(1, Ordering::Relaxed);
            self.inner
                .pairs_refused
                .fetch_add(refused, Ordering::Relaxed);
        }
        self.log(&report);
        report
    }

    fn rebuild(&self, old: &Snapshot, state: DirState) -> (Snapshot, ReloadReport) {
        let dir = &self.inner.dir;
        let mut report = ReloadReport::default();
        let scan = match state.scan {
            Ok(scan) => scan,
            Err(error) => {
                report.refused.push(Refusal {
                    name: None,
                    kept_previous: !old.entries.is_empty(),
                    error,
                });
                report.unchanged = old.entries.keys().cloned().collect();
                report.default = old.default.clone();
                let entries = old.entries.clone();
                let snap = Snapshot::new(
                    entries,
                    self.inner.default_name.as_deref(),
                    state.fingerprint,
                );
                return (snap, report);
            }
        };

        let now = time::now_unix();
        let mut entries = BTreeMap::new();
        let mut seen = BTreeSet::new();
        let mut failures = Vec::new();
        for (spec, files) in scan.pairs.iter().zip(state.files) {
            seen.insert(spec.name.clone());
            let parsed = files.and_then(|files| match old.entries.get(&spec.name) {
                Some(prev)
                    if prev.pair.spec == *spec
                        && prev.pair.content_hash == content_hash(&files) =>
                {
                    Ok(Parsed::Unchanged(prev.pair.clone()))
                }
                _ => parse_pair(spec, &files).map(Parsed::New),
            });
            let pair = match parsed {
                Ok(Parsed::Unchanged(pair)) => {
                    report.unchanged.push(spec.name.clone());
                    pair
                }
                Ok(Parsed::New(pair)) => {
                    if old.entries.contains_key(&spec.name) {
                        report.updated.push(spec.name.clone());
                    } else {
                        report.added.push(spec.name.clone());
                    }
                    if let Some(problem) = pair.validity_problem(now) {
                        report.warnings.push(problem);
                    }
                    Arc::new(pair)
                }
                Err(error) => {
                    failures.push((spec.name.clone(), error));
                    continue;
                }
            };
            entries.insert(
                spec.name.clone(),
                Entry {
                    pair,
                    last_error: None,
                },
            );
        }
        for (name, error) in scan.problems {
            seen.insert(name.clone());
            failures.push((name, error));
        }
        failures.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, error) in failures {
            let kept_previous = match old.entries.get(&name) {
                Some(prev) => {
                    entries.insert(
                        name.clone(),
                        Entry {
                            pair: prev.pair.clone(),
                            last_error: Some(error.to_string()),
                        },
                    );
                    true
                }
                None => false,
            };
            report.refused.push(Refusal {
                name: Some(name),
                kept_previous,
                error,
            });
        }
        report.removed = old
            .entries
            .keys()
            .filter(|name| !seen.contains(*name))
            .cloned()
            .collect();

        if entries.is_empty() && !old.entries.is_empty() {
            // Never end up serving nothing: keep the last good set.
            report.refused.push(Refusal {
                name: None,
                kept_previous: true,
                error: CertError::NoPairs { dir: dir.clone() },
            });
            report.removed.clear();
            report.unchanged = old.entries.keys().cloned().collect();
            entries = old.entries.clone();
        }

        if let Some(name) = self.inner.default_name.as_deref() {
            if !entries.contains_key(name) {
                let names = entries.keys().cloned().collect();
                report.warnings.push(default_not_found(dir, name, &names));
            }
        }
        let snap = Snapshot::new(
            entries,
            self.inner.default_name.as_deref(),
            state.fingerprint,
        );
        report.default = snap.default.clone();
        (snap, report)
    }

    fn log(&self, report: &ReloadReport) {
        let dir = self.inner.dir.display();
        for refusal in &report.refused {
            tracing::warn!(
                dir = %dir,
                pair = refusal.name.as_deref().unwrap_or("*"),
                file = %refusal.error.path().display(),
                kept_previous = refusal.kept_previous,
                error = %refusal.error,
                "TLS certificate refused"
            );
        }
        for warning in &report.warnings {
            tracing::warn!(dir = %dir, file = %warning.path().display(), error = %warning, "TLS certificate warning");
        }
        if report.changed() {
            let snap = self.inner.current.load();
            tracing::info!(
                dir = %dir,
                added = ?report.added,
                updated = ?report.updated,
                removed = ?report.removed,
                default = report.default.as_deref().unwrap_or(""),
                certificates = %describe(&snap),
                "TLS certificates reloaded"
            );
        } else {
            tracing::debug!(dir = %dir, refused = report.refused.len(), "TLS certificates unchanged");
        }
    }

    /// Hash of the directory contents the current certificates were built from.
    pub(crate) fn fingerprint(&self) -> [u8; 32] {
        self.inner.current.load().fingerprint
    }

    /// One entry per served pair, in name order.
    pub fn summary(&self) -> Vec<CertSummary> {
        let snap = self.inner.current.load();
        let now = time::now_unix();
        snap.entries
            .iter()
            .map(|(name, entry)| {
                let pair = &entry.pair;
                CertSummary {
                    name: name.clone(),
                    cert_path: pair.spec.cert.clone(),
                    key_path: pair.spec.key.clone(),
                    layout: pair.spec.layout,
                    dns_names: pair.dns_names.clone(),
                    ip_addresses: pair.ip_addresses.iter().map(ToString::to_string).collect(),
                    not_before: pair.not_before,
                    not_after: pair.not_after,
                    not_after_rfc3339: time::rfc3339(pair.not_after),
                    expired: now > pair.not_after,
                    sha256: pair.sha256.clone(),
                    chain_len: pair.key.cert.len(),
                    is_default: snap.default.as_deref() == Some(name.as_str()),
                    last_error: entry.last_error.clone(),
                }
            })
            .collect()
    }

    /// Reload counters and the number of pairs served.
    pub fn stats(&self) -> CertStats {
        CertStats {
            reloads_ok: self.inner.reloads_ok.load(Ordering::Relaxed),
            reloads_refused: self.inner.reloads_refused.load(Ordering::Relaxed),
            pairs_refused: self.inner.pairs_refused.load(Ordering::Relaxed),
            certificates: self.inner.current.load().entries.len() as u64,
        }
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = self.inner.current.load();
        f.debug_struct("CertStore")
            .field("dir", &self.inner.dir)
            .field("pairs", &snap.entries.keys().collect::<Vec<_>>())
            .field("default", &snap.default)
            .finish()
    }
}

/// `ehr [ehr.example.org] until 2026-03-01T00:00:00Z, wild [*.example.org] until …`
fn describe(snap: &Snapshot) -> String {
    snap.entries
        .iter()
        .map(|(name, e)| {
            format!(
                "{name} [{}] until {}",
                e.pair.dns_names.join(" "),
                time::rfc3339(e.pair.not_after)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn default_not_found(dir: &Path, name: &str, names: &BTreeSet<String>) -> CertError {
    CertError::DefaultNotFound {
        dir: dir.to_path_buf(),
        name: name.to_owned(),
        available: names.iter().cloned().collect::<Vec<_>>().join(", "),
    }
}

/// Every pair of a directory, parsed: the good ones, the problems by pair name
/// (sorted), and every pair name seen (good or bad).
struct Checked {
    loaded: Vec<LoadedPair>,
    problems: Vec<(String, CertError)>,
    names: BTreeSet<String>,
}

fn check(state: DirState) -> Result<Checked, CertError> {
    let scan = state.scan?;
    let mut checked = Checked {
        loaded: Vec::new(),
        problems: Vec::new(),
        names: BTreeSet::new(),
    };
    for (spec, files) in scan.pairs.iter().zip(state.files) {
        checked.names.insert(spec.name.clone());
        match files.and_then(|files| parse_pair(spec, &files)) {
            Ok(pair) => checked.loaded.push(pair),
            Err(e) => checked.problems.push((spec.name.clone(), e)),
        }
    }
    for (name, e) in scan.problems {
        checked.names.insert(name.clone());
        checked.problems.push((name, e));
    }
    checked.problems.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(checked)
}

/// Every problem in `dir`, none fatal-first: unreadable directory, no pair, bad
/// pairs, and expired or not-yet-valid certificates. Empty = fine.
pub fn validate_dir(dir: &Path) -> Vec<CertError> {
    let checked = match check(read_dir_state(dir)) {
        Ok(c) => c,
        Err(e) => return vec![e],
    };
    let now = time::now_unix();
    let mut problems: Vec<(String, CertError)> = checked.problems;
    for pair in &checked.loaded {
        if let Some(p) = pair.validity_problem(now) {
            problems.push((pair.spec.name.clone(), p));
        }
    }
    problems.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out: Vec<CertError> = problems.into_iter().map(|(_, e)| e).collect();
    if checked.names.is_empty() {
        out.push(CertError::NoPairs {
            dir: dir.to_path_buf(),
        });
    }
    out
}
