//! The validated, typed module description used to build route tables. No serde here:
//! every value has been checked and defaulted by [`crate::validate_manifest`].
use std::{fmt, net::SocketAddr, sync::Arc, time::Duration};

use crate::DenyRules;

/// A module's name: `[a-z0-9][a-z0-9_-]*`, at most 63 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleName(pub Arc<str>);

impl fmt::Display for ModuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl ModuleName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A stable instance identity within a module (defaults to its address).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(pub Arc<str>);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl InstanceId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A routed path prefix: starts with `/`, no trailing `/` except the root itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathPrefix(pub Arc<str>);

impl PathPrefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PathPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A host a module answers for: exact (`ehr.example.org`) or one-label wildcard (`*.example.org`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    Exact(Arc<str>),
    /// Holds the suffix including the leading dot: `.example.org`.
    Wildcard(Arc<str>),
}

impl HostPattern {
    /// `host` must already be lowercase and without a port.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => &**h == host,
            HostPattern::Wildcard(suffix) => {
                host.len() > suffix.len()
                    && host.ends_with(&**suffix)
                    && !host[..host.len() - suffix.len()].contains('.')
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s) => write!(f, "*{s}"),
        }
    }
}

/// What a consistent hash is computed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    ClientIp,
    Header(String),
    Cookie(String),
}

/// How a module's instances share new requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadBalancing {
    /// Smooth weighted round robin.
    RoundRobin,
    /// Fewest requests in flight, relative to weight.
    LeastConnections,
    /// Weighted rendezvous hash of a request key.
    ConsistentHash(HashOn),
}

impl LoadBalancing {
    pub fn name(&self) -> &'static str {
        match self {
            LoadBalancing::RoundRobin => "round_robin",
            LoadBalancing::LeastConnections => "least_connections",
            LoadBalancing::ConsistentHash(_) => "consistent_hash",
        }
    }
}

/// Upstream timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    /// How long an idle upstream keep-alive connection is kept in the pool.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            read: Duration::from_secs(600),
            write: Duration::from_secs(600),
            idle: Duration::from_secs(90),
        }
    }
}

/// Accepted status codes, as inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRanges(pub Vec<(u16, u16)>);

impl StatusRanges {
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= status && status <= hi)
    }
}

impl fmt::Display for StatusRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (lo, hi)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

/// Active health check (HTTP GET) and passive failure counting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSpec {
    /// Active checks on; when off an instance counts healthy until passive failures say not.
    pub enabled: bool,
    pub path: String,
    /// Host header sent with the check (default: the instance address).
    pub host: Option<String>,
    pub expect_status: StatusRanges,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes that bring a down instance back (a new instance needs one).
    pub rise: u32,
    /// Consecutive failed checks that take an instance down.
    pub fall: u32,
    /// Consecutive failed requests (connect or I/O errors) that take an instance down.
    pub max_fails: u32,
    /// Without active checks, how long a passively failed instance stays down.
    pub fail_timeout: Duration,
}

impl Default for HealthCheckSpec {
    fn default() -> Self {
        HealthCheckSpec {
            enabled: true,
            path: "/".into(),
            host: None,
            expect_status: StatusRanges(vec![(200, 399)]),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 3,
            max_fails: 3,
            fail_timeout: Duration::from_secs(10),
        }
    }
}

/// One instance of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    pub id: InstanceId,
    pub addr: SocketAddr,
    /// At least 1: weight 0 is refused (use `draining` to stop new traffic).
    pub weight: u32,
    pub draining: bool,
}

/// A validated module.
#[derive(Debug, Clone)]
pub struct ModuleSpec {
    pub name: ModuleName,
    pub prefixes: Vec<PathPrefix>,
    pub hosts: Vec<HostPattern>,
    pub strip_prefix: bool,
    pub load_balancing: LoadBalancing,
    pub session_cookies: Vec<String>,
    pub deny: DenyRules,
    pub max_body_size: u64,
    pub retries: u32,
    pub timeouts: Timeouts,
    pub health_check: HealthCheckSpec,
    /// Present when session affinity is on.
    pub affinity: Option<AffinitySpec>,
    /// Where DNS discovery finds more instances, if anywhere.
    pub dns: Option<DnsQuery>,
    pub instances: Vec<InstanceSpec>,
}

/// Session affinity of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffinitySpec {
    /// Name of SPACE's routing cookie.
    pub cookie: String,
    /// `Max-Age` of the routing cookie; `None` = browser-session cookie.
    pub max_age: Option<Duration>,
    /// How long a draining instance keeps serving its pinned sessions.
    pub drain_timeout: Duration,
    /// Over HTTPS, add `Secure` to the backend's session cookies.
    pub secure_session_cookies: bool,
    /// Over HTTPS, add `SameSite=<value>` to the backend's session cookies lacking one.
    pub session_cookie_samesite: Option<SameSite>,
}

/// A cookie `SameSite` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

impl SameSite {
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

/// Default drain deadline: one hour, long enough for a clinic's session to end naturally.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);

/// Default request body limit: 32 MiB, LibreEHR's routine upload size.
pub const DEFAULT_MAX_BODY: u64 = 32 * 1024 * 1024;

/// A DNS name whose records are a module's instances.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DnsQuery {
    /// A/AAAA records of `name`; every address is an instance on `port`.
    Address { name: String, port: u16 },
    /// SRV records of `name`: targets, ports and weights.
    Srv { name: String },
}

impl fmt::Display for DnsQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsQuery::Address { name, port } => write!(f, "{name}:{port}"),
            DnsQuery::Srv { name } => write!(f, "SRV {name}"),
        }
    }
}
