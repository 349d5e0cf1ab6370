//! The DNS discovery provider (design decision 4): turns Kubernetes headless-service names
//! into module instances and keeps them current.
//!
//! [`DnsDiscovery`] owns one refresh loop per module with a `dns`/`srv` query, the
//! hickory-resolver they share, and each module's last known instances. It hands every
//! changed instance set to one callback and keeps per-module [`DnsStatus`] for the admin API.
//!
//! - **What a query yields.** [`DnsQuery::Address`]: every A and AAAA address is an instance
//!   on the given port, id `IP:PORT` (`[::1]:80` for IPv6), weight 1. [`DnsQuery::Srv`]: every
//!   SRV record of the lowest priority present is an instance on its target's address and the
//!   record's port, weight = SRV weight (0 counts as 1), id `target:port` (target lowercased,
//!   no trailing dot), or `target:port/IP` when a target has several addresses. Target
//!   addresses come from the answer's additional section when it carries any for that target,
//!   else from an A/AAAA lookup of the target. Instances are sorted by id, so equal sets
//!   compare equal and the callback runs only when the set really changed.
//! - **Names are absolute.** Every name is queried as a fully qualified name, with or without
//!   its trailing dot: search domains and `ndots` from `/etc/resolv.conf` are never applied,
//!   and `/etc/hosts` is never consulted. Write the whole Kubernetes name
//!   (`portal.ehr.svc.cluster.local`).
//! - **When.** A module is re-resolved when its answer's TTL (the smallest record TTL) runs
//!   out, clamped to [`DnsSettings::min_interval`, `DnsSettings::max_interval`]. Hickory's
//!   cache is bounded to `max_interval` and the entries a refresh reads are evicted first, so
//!   every refresh asks the name server again.
//! - **Failure keeps the last good set.** A lookup error, a timeout, an empty answer or
//!   NXDOMAIN never reaches the callback: the last known instances stay, the failure is
//!   counted and logged (warning naming the module and the query), and the lookup is retried
//!   after `min_interval`, doubling up to `max_interval` while failures continue. A refresh is
//!   only a success when every lookup it needed answered: a partial answer (A answered, AAAA
//!   timed out) is a failure, so instances never vanish because one query was lost.
//! - **Resolver.** [`DnsSettings::resolver`] = exactly that name server (UDP, and TCP for
//!   truncated answers, both on its port); `None` = the name servers and options of
//!   `/etc/resolv.conf`.
//!
//! Callback contract: `on_update` runs on the provider's tasks, never inside
//! [`DnsDiscovery::set_targets`], and never while a lock of this module is held, so it may
//! call back into code that calls `set_targets` (as the registry's rebuild hook does).
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hickory_resolver::{
    config::{NameServerConfig, ResolveHosts, ResolverConfig},
    lookup::Lookup,
    net::{runtime::TokioRuntimeProvider, DnsError as ProtocolDnsError, NetError},
    proto::{
        op::ResponseCode,
        rr::{rdata::SRV, Name, RData, RecordType},
    },
    TokioResolver,
};
use serde::Serialize;
use space_modules::{DnsQuery, InstanceId, InstanceSpec, ModuleName};
use tokio::{runtime::Handle, task::JoinHandle};

use crate::DnsSettings;

/// Called with a module and its new instance set (sorted by id, never empty).
pub type DnsUpdateFn = Arc<dyn Fn(&ModuleName, Vec<InstanceSpec>) + Send + Sync>;

/// Longest one refresh (all the lookups it needs) may take before it counts as failed;
/// hickory's own per-query timeouts and attempts normally end it sooner.
const REFRESH_DEADLINE: Duration = Duration::from_secs(30);

/// Why the DNS provider could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// [`DnsDiscovery::spawn`] was called outside a tokio runtime.
    #[error("the DNS provider (resolver {resolver}) must be started inside a tokio runtime")]
    NoRuntime { resolver: String },
    /// The intervals cannot drive a refresh schedule.
    #[error("DNS provider (resolver {resolver}): {reason}")]
    InvalidSettings { resolver: String, reason: String },
    /// `/etc/resolv.conf` could not be read or parsed (only when no resolver is configured).
    #[error("cannot read the system DNS configuration for resolver {resolver}: {source}; set [discovery.dns].resolver to an IP:PORT to bypass it")]
    SystemConfig {
        resolver: String,
        #[source]
        source: NetError,
    },
    /// hickory refused the resolver configuration.
    #[error("cannot build the DNS resolver for {resolver}: {source}")]
    Build {
        resolver: String,
        #[source]
        source: NetError,
    },
}

/// One module's DNS discovery state, for the admin API and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsStatus {
    pub module: String,
    /// The query as configured ([`DnsQuery`]'s `Display`: `name:port` or `SRV name`).
    pub query: String,
    /// How many instances the last good answer held (0 before the first one).
    pub instances: usize,
    /// When the last good answer arrived (Unix seconds).
    pub last_success_unix: Option<u64>,
    /// Why the refreshes since the last good answer failed; `None` once an answer succeeds.
    pub last_error: Option<String>,
    /// Failed or empty answers since this module's query was set.
    pub failures_total: u64,
    /// Time until the next refresh; 0 while a refresh is running.
    pub next_refresh_in_ms: u64,
}

/// The DNS discovery provider: one refresh loop per target module on the tokio runtime it
/// was spawned on.
///
/// A cheap handle: clones share the loops; dropping the last clone, or
/// [`DnsDiscovery::shutdown`], stops all of them. (A clone captured by `on_update` itself
/// keeps the provider alive: call `shutdown` then.)
#[derive(Clone)]
pub struct DnsDiscovery {
    shared: Arc<Shared>,
    _last_handle: Arc<ShutdownOnDrop>,
}

impl fmt::Debug for DnsDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsDiscovery")
            .field("resolver", &self.shared.resolver_label)
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl DnsDiscovery {
    /// Starts the provider on the current tokio runtime. `on_update(module, instances)` is
    /// called (from the provider's task) whenever a module's resolved instance set changes,
    /// including the first successful answer. It is never called with an empty list because
    /// of a failure: an empty or failed answer keeps the last known instances.
    ///
    /// No module is resolved until [`DnsDiscovery::set_targets`] names some.
    pub fn spawn(settings: DnsSettings, on_update: DnsUpdateFn) -> Result<DnsDiscovery, DnsError> {
        let resolver_label = match settings.resolver {
            Some(addr) => addr.to_string(),
            None => "system (/etc/resolv.conf)".to_string(),
        };
        let runtime = Handle::try_current().map_err(|_| DnsError::NoRuntime {
            resolver: resolver_label.clone(),
        })?;
        if settings.min_interval.is_zero() || settings.min_interval > settings.max_interval {
            return Err(DnsError::InvalidSettings {
                resolver: resolver_label,
                reason: format!(
                    "min_interval ({:?}) must be above zero and at most max_interval ({:?})",
                    settings.min_interval, settings.max_interval
                ),
            });
        }
        let resolver = build_resolver(&settings, &resolver_label)?;
        let shared = Arc::new(Shared {
            resolver,
            resolver_label,
            settings,
            on_update,
            runtime,
            running: Mutex::new(BTreeMap::new()),
            shut_down: AtomicBool::new(false),
        });
        Ok(DnsDiscovery {
            _last_handle: Arc::new(ShutdownOnDrop(shared.clone())),
            shared,
        })
    }

    /// Which modules resolve which names; called after every configuration change. Starts
    /// loops for new targets, stops loops for removed ones (and calls nothing for them),
    /// restarts when a module's query changed. Idempotent for an unchanged set.
    ///
    /// Returns at once (the first answers arrive through `on_update`). A callback already
    /// running for a removed module may still finish; none starts after this returns. If a
    /// module appears twice, its last query wins. Ignored after [`DnsDiscovery::shutdown`].
    pub fn set_targets(&self, targets: Vec<(ModuleName, DnsQuery)>) {
        let shared = &self.shared;
        let wanted: BTreeMap<ModuleName, DnsQuery> = targets.into_iter().collect();
        let mut running = shared.lock_running();
        if shared.shut_down.load(Ordering::SeqCst) {
            return;
        }
        running.retain(|module, loop_| {
            let keep = wanted.get(module) == Some(&loop_.target.query);
            if !keep {
                tracing::info!(module = %module, query = %loop_.target.query, "DNS discovery stopped for the module");
                loop_.stop();
            }
            keep
        });
        for (module, query) in wanted {
            if running.contains_key(&module) {
                continue;
            }
            tracing::info!(module = %module, query = %query, resolver = %shared.resolver_label, "DNS discovery started for the module");
            let target = Arc::new(Target {
                module: module.clone(),
                query,
                stopped: AtomicBool::new(false),
                state: Mutex::new(TargetState::default()),
            });
            let task = shared
                .runtime
                .spawn(refresh_loop(shared.clone(), target.clone()));
            running.insert(module, RunningLoop { target, task });
        }
    }

    /// Per-module status for the admin API and metrics, sorted by module name.
    pub fn status(&self) -> Vec<DnsStatus> {
        let targets: Vec<Arc<Target>> = self
            .shared
            .lock_running()
            .values()
            .map(|l| l.target.clone())
            .collect();
        let now = Instant::now();
        targets
            .iter()
            .map(|target| {
                let state = target.lock_state();
                DnsStatus {
                    module: target.module.to_string(),
                    query: target.query.to_string(),
                    instances: state.instances.as_ref().map_or(0, Vec::len),
                    last_success_unix: state.last_success.map(unix_seconds),
                    last_error: state.last_error.clone(),
                    failures_total: state.failures_total,
                    next_refresh_in_ms: state.next_refresh.map_or(0, |at| {
                        u64::try_from(at.saturating_duration_since(now).as_millis())
                            .unwrap_or(u64::MAX)
                    }),
                }
            })
            .collect()
    }

    /// The name server in use: `IP:PORT`, or `system (/etc/resolv.conf)`.
    pub fn resolver(&self) -> &str {
        &self.shared.resolver_label
    }

    /// Stops every loop; no callback starts afterwards and later `set_targets` calls are
    /// ignored. Idempotent; dropping the last handle does the same.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }
}

/// State shared by the handle and the loops.
struct Shared {
    resolver: TokioResolver,
    resolver_label: String,
    settings: DnsSettings,
    on_update: DnsUpdateFn,
    runtime: Handle,
    running: Mutex<BTreeMap<ModuleName, RunningLoop>>,
    shut_down: AtomicBool,
}

impl Shared {
    fn lock_running(&self) -> MutexGuard<'_, BTreeMap<ModuleName, RunningLoop>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shutdown(&self) {
        let mut running = self.lock_running();
        self.shut_down.store(true, Ordering::SeqCst);
        for (_, loop_) in std::mem::take(&mut *running) {
            loop_.stop();
        }
    }
}

/// Shuts the provider down when the last [`DnsDiscovery`] clone drops. (The loops hold
/// `Arc<Shared>` too, so `Shared` itself cannot be the trigger.)
struct ShutdownOnDrop(Arc<Shared>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

struct RunningLoop {
    target: Arc<Target>,
    task: JoinHandle<()>,
}

impl RunningLoop {
    fn stop(&self) {
        self.target.stopped.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

/// One module's query and what its loop learned.
struct Target {
    module: ModuleName,
    query: DnsQuery,
    /// Set before the loop is aborted: the loop checks it right before each callback.
    stopped: AtomicBool,
    state: Mutex<TargetState>,
}

impl Target {
    fn lock_state(&self) -> MutexGuard<'_, TargetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct TargetState {
    /// The last good answer; `None` until the first one.
    instances: Option<Vec<InstanceSpec>>,
    last_success: Option<SystemTime>,
    last_error: Option<String>,
    failures_total: u64,
    next_refresh: Option<Instant>,
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn build_resolver(settings: &DnsSettings, label: &str) -> Result<TokioResolver, DnsError> {
    let mut builder = match settings.resolver {
        Some(addr) => {
            let mut server = NameServerConfig::udp_and_tcp(addr.ip());
            for connection in &mut server.connections {
                connection.port = addr.port();
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![server]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio().map_err(|source| DnsError::SystemConfig {
            resolver: label.to_string(),
            source,
        })?,
    };
    let options = builder.options_mut();
    // Kubernetes names are absolute, and /etc/hosts would mask the service's records.
    options.use_hosts_file = ResolveHosts::Never;
    // The cache must never answer a refresh that our schedule wants from the server: positive
    // entries live at most max_interval (a refresh comes no later), negative ones not at all
    // (a name that comes back is seen at the next retry). Each refresh also evicts the entries
    // it is about to read; see `fresh_lookup`.
    options.positive_max_ttl = Some(settings.max_interval);
    options.negative_max_ttl = Some(Duration::ZERO);
    builder.build().map_err(|source| DnsError::Build {
        resolver: label.to_string(),
        source,
    })
}

/// Resolves `target` forever: success schedules the next refresh by TTL, failure backs off.
async fn refresh_loop(shared: Arc<Shared>, target: Arc<Target>) {
    let settings = &shared.settings;
    let mut failures_in_row: u32 = 0;
    loop {
        let outcome =
            match tokio::time::timeout(REFRESH_DEADLINE, resolve(&shared.resolver, &target.query))
                .await
            {
                Ok(outcome) => outcome,
                Err(_) => Err(Failure::Error(format!(
                    "no answer within {REFRESH_DEADLINE:?}"
                ))),
            };
        let delay = match outcome {
            Ok(answer) => {
                failures_in_row = 0;
                let delay = answer
                    .ttl
                    .unwrap_or(settings.max_interval)
                    .clamp(settings.min_interval, settings.max_interval);
                let changed = {
                    let mut state = target.lock_state();
                    state.last_success = Some(SystemTime::now());
                    state.last_error = None;
                    let changed = state.instances.as_ref() != Some(&answer.instances);
                    if changed {
                        state.instances = Some(answer.instances.clone());
                    }
                    changed
                };
                if changed && !target.stopped.load(Ordering::SeqCst) {
                    tracing::info!(
                        module = %target.module,
                        query = %target.query,
                        instances = answer.instances.len(),
                        "DNS instances changed"
                    );
                    (shared.on_update)(&target.module, answer.instances);
                } else {
                    tracing::debug!(module = %target.module, query = %target.query, "DNS instances unchanged");
                }
                delay
            }
            Err(failure) => {
                failures_in_row = failures_in_row.saturating_add(1);
                let delay = backoff(settings, failures_in_row);
                let message = failure.to_string();
                let kept = {
                    let mut state = target.lock_state();
                    state.failures_total += 1;
                    state.last_error = Some(message.clone());
                    state.instances.as_ref().map_or(0, Vec::len)
                };
                tracing::warn!(
                    module = %target.module,
                    query = %target.query,
                    resolver = %shared.resolver_label,
                    error = %message,
                    kept_instances = kept,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "DNS refresh of module {} ({}) failed; keeping its last known instances",
                    target.module,
                    target.query,
                );
                delay
            }
        };
        target.lock_state().next_refresh = Some(Instant::now() + delay);
        tokio::time::sleep(delay).await;
        target.lock_state().next_refresh = None;
    }
}

/// `min_interval` after the first failure, doubling per further failure, at most
/// `max_interval`.
fn backoff(settings: &DnsSettings, failures_in_row: u32) -> Duration {
    let factor = 1u32 << failures_in_row.saturating_sub(1).min(16);
    settings
        .min_interval
        .saturating_mul(factor)
        .min(settings.max_interval)
}

/// A good answer: the instances (sorted by id, not empty) and the smallest record TTL.
#[derive(Debug)]
struct Answer {
    instances: Vec<InstanceSpec>,
    ttl: Option<Duration>,
}

/// Why a refresh yielded nothing usable.
#[derive(Debug)]
enum Failure {
    /// The server answered, but with no usable records (NXDOMAIN, NODATA, only unusable
    /// SRV targets).
    Empty(String),
    /// No answer: lookup error, server failure, timeout, bad name.
    Error(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Empty(why) => write!(f, "empty answer: {why}"),
            Failure::Error(why) => f.write_str(why),
        }
    }
}

async fn resolve(resolver: &TokioResolver, query: &DnsQuery) -> Result<Answer, Failure> {
    match query {
        DnsQuery::Address { name, port } => {
            let name = absolute_name(name)?;
            let found = lookup_addresses(resolver, &name).await?;
            let ttl = found.iter().map(|a| a.ttl).min();
            let instances = found
                .into_iter()
                .map(|a| {
                    let addr = SocketAddr::new(a.ip, *port);
                    InstanceSpec {
                        id: InstanceId(addr.to_string().into()),
                        addr,
                        weight: 1,
                        draining: false,
                    }
                })
                .collect();
            Ok(Answer {
                instances: sorted_unique(instances),
                ttl: ttl.map(secs),
            })
        }
        DnsQuery::Srv { name } => resolve_srv(resolver, &absolute_name(name)?).await,
    }
}

/// `name` as a fully qualified name (a trailing dot is optional in the configuration).
fn absolute_name(name: &str) -> Result<Name, Failure> {
    let mut parsed = Name::from_ascii(name)
        .map_err(|e| Failure::Error(format!("invalid DNS name {name:?}: {e}")))?;
    parsed.set_fqdn(true);
    Ok(parsed)
}

fn secs(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl))
}

/// An address record with its TTL.
#[derive(Debug, Clone, Copy)]
struct FoundAddr {
    ip: IpAddr,
    ttl: u32,
}

/// What the server said about one name and type.
enum Found {
    Records(Lookup),
    /// NXDOMAIN, or NODATA (`NoError` without records).
    Nothing(ResponseCode),
}

impl Found {
    fn lookup(&self) -> Option<&Lookup> {
        match self {
            Found::Records(lookup) => Some(lookup),
            Found::Nothing(_) => None,
        }
    }

    fn is_nxdomain(&self) -> bool {
        matches!(self, Found::Nothing(ResponseCode::NXDomain))
    }
}

/// Names the empty answer for `name` (`NXDOMAIN` or `NODATA`).
fn nothing_for(name: &Name, what: &str, nxdomain: bool) -> Failure {
    let code = if nxdomain { "NXDOMAIN" } else { "NODATA" };
    Failure::Empty(format!("no {what} records for {name} ({code})"))
}

/// One lookup from the server (the cache entry for it evicted first).
async fn fresh_lookup(
    resolver: &TokioResolver,
    name: &Name,
    record_type: RecordType,
) -> Result<Found, Failure> {
    resolver.clear_lookup_cache(name.clone(), record_type);
    match resolver.lookup(name.clone(), record_type).await {
        Ok(lookup) => Ok(Found::Records(lookup)),
        Err(NetError::Dns(ProtocolDnsError::NoRecordsFound(none))) => {
            Ok(Found::Nothing(none.response_code))
        }
        Err(e) => Err(Failure::Error(format!(
            "{record_type} lookup of {name} failed: {e}"
        ))),
    }
}

/// A and AAAA records of `name`, both asked; any lookup error fails the whole answer.
async fn lookup_addresses(
    resolver: &TokioResolver,
    name: &Name,
) -> Result<Vec<FoundAddr>, Failure> {
    let (v4, v6) = tokio::join!(
        fresh_lookup(resolver, name, RecordType::A),
        fresh_lookup(resolver, name, RecordType::AAAA)
    );
    let (v4, v6) = (v4?, v6?);
    let found: Vec<FoundAddr> = [&v4, &v6]
        .into_iter()
        .filter_map(Found::lookup)
        .flat_map(Lookup::answers)
        .filter_map(|record| {
            address_of(&record.data).map(|ip| FoundAddr {
                ip,
                ttl: record.ttl,
            })
        })
        .collect();
    if found.is_empty() {
        return Err(nothing_for(
            name,
            "A or AAAA",
            v4.is_nxdomain() || v6.is_nxdomain(),
        ));
    }
    Ok(found)
}

fn address_of(data: &RData) -> Option<IpAddr> {
    match data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
        _ => None,
    }
}

/// `name` lowercased, without the trailing dot: the target part of SRV instance ids.
fn display_target(name: &Name) -> String {
    name.to_lowercase()
        .to_ascii()
        .trim_end_matches('.')
        .to_string()
}

async fn resolve_srv(resolver: &TokioResolver, name: &Name) -> Result<Answer, Failure> {
    let lookup = match fresh_lookup(resolver, name, RecordType::SRV).await? {
        Found::Records(lookup) => lookup,
        Found::Nothing(code) => {
            return Err(nothing_for(name, "SRV", code == ResponseCode::NXDomain))
        }
    };
    let records: Vec<(&SRV, u32)> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            // A target of "." means "no service here" (RFC 2782).
            RData::SRV(srv) if !srv.target.is_root() => Some((srv, r.ttl)),
            _ => None,
        })
        .collect();
    // Records with a higher priority number are backups, for when every target of the lowest
    // number fails; instances carry no priority, so only the lowest number becomes instances.
    let Some(lowest) = records.iter().map(|(srv, _)| srv.priority).min() else {
        return Err(Failure::Empty(format!("no usable SRV records for {name}")));
    };
    let records: Vec<(&SRV, u32)> = records
        .into_iter()
        .filter(|(srv, _)| srv.priority == lowest)
        .collect();

    // Target addresses the server sent along.
    let mut addresses: HashMap<Name, Vec<FoundAddr>> = HashMap::new();
    for record in lookup.additionals() {
        if let Some(ip) = address_of(&record.data) {
            addresses
                .entry(record.name.to_lowercase())
                .or_default()
                .push(FoundAddr {
                    ip,
                    ttl: record.ttl,
                });
        }
    }
    // Look up the others (each once).
    let mut missing: Vec<Name> = records
        .iter()
        .map(|(srv, _)| srv.target.to_lowercase())
        .filter(|target| !addresses.contains_key(target))
        .collect();
    missing.sort();
    missing.dedup();
    let mut unresolved = Vec::new();
    for target in missing {
        match lookup_addresses(resolver, &target).await {
            Ok(found) => {
                addresses.insert(target, found);
            }
            // The target is gone (e.g. a pod being deleted): skip it, keep the others.
            Err(Failure::Empty(why)) => unresolved.push(why),
            Err(error) => return Err(error),
        }
    }

    // The smallest TTL of the SRV records and of the target addresses used.
    let mut ttl = records
        .iter()
        .map(|(_, ttl)| *ttl)
        .min()
        .unwrap_or(u32::MAX);
    let mut instances = Vec::new();
    for (srv, _) in &records {
        let target = srv.target.to_lowercase();
        let Some(found) = addresses.get(&target) else {
            continue;
        };
        let mut ips: Vec<IpAddr> = found.iter().map(|a| a.ip).collect();
        ips.sort();
        ips.dedup();
        ttl = found.iter().map(|a| a.ttl).fold(ttl, u32::min);
        let host = display_target(&target);
        for ip in &ips {
            let id = if ips.len() == 1 {
                format!("{host}:{}", srv.port)
            } else {
                format!("{host}:{}/{ip}", srv.port)
            };
            instances.push(InstanceSpec {
                id: InstanceId(id.into()),
                addr: SocketAddr::new(*ip, srv.port),
                weight: u32::from(srv.weight).max(1),
                draining: false,
            });
        }
    }
    if instances.is_empty() {
        return Err(Failure::Empty(format!(
            "no SRV target of {name} has an address ({})",
            unresolved.join("; ")
        )));
    }
    if !unresolved.is_empty() {
        tracing::debug!(srv = %name, skipped = %unresolved.join("; "), "SRV targets without addresses skipped");
    }
    Ok(Answer {
        instances: sorted_unique(instances),
        ttl: Some(secs(ttl)),
    })
}

/// Sorted by id; of several instances with one id, the first listed stays.
fn sorted_unique(mut instances: Vec<InstanceSpec>) -> Vec<InstanceSpec> {
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    instances.dedup_by(|later, earlier| later.id == earlier.id);
    instances
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(min_ms: u64, max_ms: u64) -> DnsSettings {
        DnsSettings {
            resolver: None,
            min_interval: Duration::from_millis(min_ms),
            max_interval: Duration::from_millis(max_ms),
        }
    }

    #[test]
    fn backoff_doubles_from_min_to_max() {
        let s = settings(100, 1000);
        let delays: Vec<u64> = (1..=6).map(|n| backoff(&s, n).as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(&s, u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn names_become_absolute_with_or_without_the_dot() {
        let a = absolute_name("portal.ehr.svc.cluster.local").unwrap();
        let b = absolute_name("portal.ehr.svc.cluster.local.").unwrap();
        assert!(a.is_fqdn());
        assert_eq!(a, b);
        assert_eq!(
            display_target(&absolute_name("Portal-0.EHR.svc.cluster.local.").unwrap()),
            "portal-0.ehr.svc.cluster.local"
        );
    }

    #[test]
    fn instances_sort_by_id_and_dedup() {
        let spec = |id: &str, port: u16| InstanceSpec {
            id: InstanceId(id.into()),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight: 1,
            draining: false,
        };
        let sorted = sorted_unique(vec![spec("b", 1), spec("a", 2), spec("b", 3)]);
        let ids: Vec<(&str, u16)> = sorted
            .iter()
            .map(|i| (i.id.as_str(), i.addr.port()))
            .collect();
        assert_eq!(ids, [("a", 2), ("b", 1)]);
    }
}
