//! The `space.toml` configuration: raw serde structs (`Raw*`, unknown keys refused), then a
//! validated [`Config`] with no serde. Loading reads the manifests directory too and reports
//! every problem, each naming the file, the field and the fix, before failing.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use space_modules::{
    parse_duration, toml_issue, validate_manifest, Issue, ModuleSpec, RawManifest, SizeValue,
};

use crate::{table::find_conflicts, AffinityKeys};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    listeners: RawListeners,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    discovery: RawDiscovery,
    #[serde(default)]
    affinity: RawAffinityKeys,
    #[serde(default, rename = "module")]
    modules: Vec<RawManifest>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    threads: Option<usize>,
    grace_period: Option<String>,
    client_idle_timeout: Option<String>,
    lingering_time: Option<String>,
    max_header_size: Option<SizeValue>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    upstream_keepalive_pool: Option<usize>,
    access_log: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListeners {
    http: Option<String>,
    https: Option<String>,
    admin: Option<String>,
    h2c: Option<bool>,
    redirect_to_https: Option<bool>,
    admin_token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_dir: Option<String>,
    default_cert: Option<String>,
    hsts_max_age: Option<String>,
    #[serde(default)]
    hsts_include_subdomains: bool,
    #[serde(default)]
    generate_dev_cert: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAffinityKeys {
    key_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    manifests_dir: Option<String>,
    etcd: Option<RawEtcd>,
    dns: Option<RawDns>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    #[serde(default)]
    endpoints: Vec<String>,
    prefix: Option<String>,
    username: Option<String>,
    password_file: Option<String>,
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    snapshot_file: Option<String>,
    debounce: Option<String>,
    connect_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    resolver: Option<String>,
    min_interval: Option<String>,
    max_interval: Option<String>,
}

/// How to reach etcd and where SPACE's keys live.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdSettings {
    /// `http://host:port` or `https://host:port` URLs.
    pub endpoints: Vec<String>,
    /// Key prefix, always ending in `/` (default `/space/`).
    pub prefix: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// CA to verify etcd's certificate (TLS on when set).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Where the last good state is written, to serve from after a restart while etcd is down.
    pub snapshot_file: Option<PathBuf>,
    /// How long to gather watch events into one table change.
    pub debounce: Duration,
    pub connect_timeout: Duration,
}

impl EtcdSettings {
    /// Settings for `endpoints` with every default (used by the `space module` commands).
    pub fn new(endpoints: Vec<String>, prefix: &str) -> Self {
        EtcdSettings {
            endpoints,
            prefix: normalize_prefix(prefix),
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            snapshot_file: None,
            debounce: Duration::from_millis(5),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

/// Normalizes an etcd key prefix to end in exactly one `/`.
pub fn normalize_prefix(prefix: &str) -> String {
    format!("{}/", prefix.trim_end_matches('/'))
}

/// DNS discovery settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsSettings {
    /// Resolver to ask (`IP:PORT`); `None` = the system's (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
    /// Re-resolve no sooner than this, whatever the TTL.
    pub min_interval: Duration,
    /// Re-resolve at least this often, whatever the TTL.
    pub max_interval: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            resolver: None,
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(30),
        }
    }
}

/// Process-wide settings (changing them needs a restart).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// Worker threads for the proxy service.
    pub threads: usize,
    /// How long SIGTERM waits for requests in flight.
    pub grace_period: Duration,
    /// Idle time after which a client keep-alive connection is closed.
    pub client_idle_timeout: Duration,
    /// After refusing a request whose body is still arriving (413, 503, ...), how long SPACE
    /// keeps reading and discarding that body before closing, so the client reads the answer
    /// instead of a connection reset (nginx's `lingering_time`). Zero closes at once.
    pub lingering_time: Duration,
    /// Largest request head (request line plus headers); larger gets 431.
    pub max_header_size: usize,
    /// Peers whose X-Forwarded-* headers are kept (e.g. the cloud load balancer).
    pub trusted_proxies: Vec<IpNet>,
    /// Idle upstream connections kept for reuse.
    pub upstream_keepalive_pool: usize,
    /// Write one access-log line per request (PHI-safe: no query, cookies or credentials).
    pub access_log: bool,
}

impl ServerSettings {
    /// `client_idle_timeout` in whole seconds, at least 1 (what HTTP/1 keep-alive takes).
    pub fn keepalive_secs(&self) -> u64 {
        self.client_idle_timeout.as_secs().max(1)
    }

    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

/// Listening addresses and what they do.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerSettings {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// Accept HTTP/2 without TLS (prior knowledge) on the HTTP listener.
    pub h2c: bool,
    /// Answer plain-HTTP requests with a redirect to HTTPS.
    pub redirect_to_https: bool,
    /// Bearer token required by the admin API (always required off loopback).
    pub admin_token: Option<String>,
}

/// HTTPS settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    pub cert_dir: PathBuf,
    pub default_cert: Option<String>,
    /// `Strict-Transport-Security` value to add to HTTPS responses, if any.
    pub hsts: Option<String>,
    /// Create a self-signed development certificate in `cert_dir` when it has none.
    pub generate_dev_cert: bool,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub server: ServerSettings,
    pub listeners: ListenerSettings,
    pub tls: Option<TlsSettings>,
    pub manifests_dir: Option<PathBuf>,
    /// etcd discovery, when configured.
    pub etcd: Option<EtcdSettings>,
    /// DNS discovery settings (used by modules with `dns` or `srv`).
    pub dns: DnsSettings,
    /// Modules from the file and the manifests directory, in that order.
    pub modules: Vec<ModuleSpec>,
    /// Where each module came from (file path, `module[i]` for inline ones).
    pub module_sources: Vec<String>,
    /// Keys of the routing cookies (`[affinity].key_file`, or a per-process key).
    pub affinity_keys: AffinityKeys,
    /// Short hash of every file read, to tell replicas' states apart.
    pub revision: String,
}

/// One problem in one file.
#[derive(Debug, Clone)]
pub struct ConfigIssue {
    pub file: String,
    pub issue: Issue,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.issue)
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} problem(s) in the configuration:", self.issues.len())?;
        for issue in &self.issues {
            write!(f, "\n  {issue}")?;
        }
        Ok(())
    }
}

/// Reads and validates `path` and its manifests directory.
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        issues: vec![ConfigIssue {
            file: file.clone(),
            issue: Issue::new(
                "",
                format!("cannot read the configuration: {e}"),
                "check the path given to --config",
            ),
        }],
    })?;
    parse_config(&text, path)
}

/// A duration field: its default when absent; one that does not parse is reported, with
/// `example` in the fix, and the default used.
fn duration_field(
    push: &mut impl FnMut(&str, String, &str),
    field: &str,
    value: &Option<String>,
    default: Duration,
    example: &str,
) -> Duration {
    match value {
        None => default,
        Some(t) => parse_duration(t).unwrap_or_else(|e| {
            push(field, e, &format!("write a duration such as `{example}`"));
            default
        }),
    }
}

/// Validates configuration text as if read from `path` (relative paths resolve beside it).
pub fn parse_config(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let base = path.parent().unwrap_or(Path::new("."));
    let mut issues: Vec<ConfigIssue> = Vec::new();
    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());

    let raw: RawConfig = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            return Err(ConfigError {
                issues: vec![ConfigIssue {
                    file,
                    issue: toml_issue(text, &e),
                }],
            })
        }
    };
    let mut push = |field: &str, problem: String, fix: &str| {
        issues.push(ConfigIssue {
            file: file.clone(),
            issue: Issue::new(field, problem, fix),
        })
    };

    // [server]
    let s = &raw.server;
    let threads = s
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 || threads > 256 {
        push(
            "server.threads",
            format!("{threads} is outside 1..=256"),
            "use the number of cores, e.g. 2",
        );
    }
    let grace_period = duration_field(
        &mut push,
        "server.grace_period",
        &s.grace_period,
        Duration::from_secs(30),
        "30s",
    );
    let client_idle_timeout = duration_field(
        &mut push,
        "server.client_idle_timeout",
        &s.client_idle_timeout,
        Duration::from_secs(60),
        "30s",
    );
    let lingering_time = duration_field(
        &mut push,
        "server.lingering_time",
        &s.lingering_time,
        Duration::from_secs(10),
        "30s",
    );
    let max_header_size = match &s.max_header_size {
        None => 64 * 1024,
        Some(size) => size.bytes().map(|n| n as usize).unwrap_or_else(|e| {
            push("server.max_header_size", e, "write a size such as `64KiB`");
            64 * 1024
        }),
    };
    if !(1024..=1024 * 1024).contains(&max_header_size) {
        push(
            "server.max_header_size",
            format!("{max_header_size} bytes is outside 1KiB..=1MiB"),
            "use e.g. `64KiB` (LibreEHR cookies need a few KiB)",
        );
    }
    let mut trusted_proxies = Vec::new();
    for (i, t) in s.trusted_proxies.iter().enumerate() {
        let parsed = t
            .parse::<IpNet>()
            .or_else(|_| t.parse::<IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => push(
                &format!("server.trusted_proxies[{i}]"),
                format!("`{t}` is not an IP address or CIDR network"),
                "write e.g. `10.0.0.0/8` or `192.0.2.7`",
            ),
        }
    }
    let server = ServerSettings {
        threads: threads.clamp(1, 256),
        grace_period,
        client_idle_timeout,
        lingering_time,
        max_header_size,
        trusted_proxies,
        upstream_keepalive_pool: s.upstream_keepalive_pool.unwrap_or(256),
        access_log: s.access_log.unwrap_or(true),
    };

    // [listeners]
    let l = &raw.listeners;
    let mut addr = |field: &str, v: &Option<String>| -> Option<SocketAddr> {
        v.as_ref().and_then(|a| match a.parse::<SocketAddr>() {
            Ok(sa) => Some(sa),
            Err(_) => {
                push(
                    field,
                    format!("`{a}` is not an IP:PORT address"),
                    "write e.g. `0.0.0.0:8080` or `[::]:8443`",
                );
                None
            }
        })
    };
    let http = addr("listeners.http", &l.http);
    let https = addr("listeners.https", &l.https);
    // The admin listener is on loopback unless configured otherwise; "off" disables it.
    let admin = match l.admin.as_deref() {
        Some("off") => None,
        None => Some(SocketAddr::from(([127, 0, 0, 1], 9901))),
        Some(_) => addr("listeners.admin", &l.admin),
    };
    if l.http.is_none() && l.https.is_none() {
        push(
            "listeners",
            "no `http` or `https` listener is configured".into(),
            "add e.g. `http = \"0.0.0.0:8080\"` under [listeners]",
        );
    }
    let admin_token = match &l.admin_token_file {
        None => None,
        Some(f) => {
            let p = base.join(f);
            match std::fs::read_to_string(&p) {
                Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
                Ok(_) => {
                    push(
                        "listeners.admin_token_file",
                        format!("{} is empty", p.display()),
                        "write a long random token into it",
                    );
                    None
                }
                Err(e) => {
                    push(
                        "listeners.admin_token_file",
                        format!("cannot read {}: {e}", p.display()),
                        "create the file or fix the path",
                    );
                    None
                }
            }
        }
    };
    if let Some(a) = admin {
        if !a.ip().is_loopback() && admin_token.is_none() {
            push(
                "listeners.admin",
                format!("the admin listener {a} is not on loopback but no token is set"),
                "set `admin_token_file`, or listen on 127.0.0.1",
            );
        }
    }
    let redirect_to_https = l.redirect_to_https.unwrap_or(false);
    if redirect_to_https && https.is_none() {
        push(
            "listeners.redirect_to_https",
            "redirecting to HTTPS needs an `https` listener".into(),
            "add `https = \"0.0.0.0:8443\"` or set `redirect_to_https = false`",
        );
    }
    let listeners = ListenerSettings {
        http,
        https,
        admin,
        h2c: l.h2c.unwrap_or(true),
        redirect_to_https,
        admin_token,
    };

    // [tls]
    let tls = match (&raw.tls, https) {
        (None, Some(_)) => {
            push(
                "tls",
                "an `https` listener needs a [tls] section".into(),
                "add [tls] with `cert_dir = \"certs\"`",
            );
            None
        }
        (None, None) => None,
        (Some(t), _) => {
            let cert_dir = match &t.cert_dir {
                Some(d) => base.join(d),
                None => {
                    push(
                        "tls.cert_dir",
                        "missing".into(),
                        "set `cert_dir` to the directory holding NAME.crt and NAME.key pairs",
                    );
                    PathBuf::new()
                }
            };
            let hsts = match &t.hsts_max_age {
                None => None,
                Some(v) => match parse_duration(v) {
                    Ok(d) => Some(format!(
                        "max-age={}{}",
                        d.as_secs(),
                        if t.hsts_include_subdomains {
                            "; includeSubDomains"
                        } else {
                            ""
                        }
                    )),
                    Err(e) => {
                        push("tls.hsts_max_age", e, "write a duration such as `365d`");
                        None
                    }
                },
            };
            Some(TlsSettings {
                cert_dir,
                default_cert: t.default_cert.clone(),
                hsts,
                generate_dev_cert: t.generate_dev_cert,
            })
        }
    };

    // [discovery.etcd], [discovery.dns]
    let etcd = raw.discovery.etcd.as_ref().map(|e| {
        if e.endpoints.is_empty() {
            push(
                "discovery.etcd.endpoints",
                "no endpoint".into(),
                "list etcd's client URLs, e.g. `endpoints = [\"http://10.0.0.2:2379\"]`",
            );
        }
        for (i, ep) in e.endpoints.iter().enumerate() {
            let ok = ep
                .strip_prefix("http://")
                .or_else(|| ep.strip_prefix("https://"))
                .is_some_and(|hp| {
                    hp.rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                });
            if !ok {
                push(
                    &format!("discovery.etcd.endpoints[{i}]"),
                    format!("`{ep}` is not an http(s)://HOST:PORT URL"),
                    "write e.g. `http://127.0.0.1:2379`",
                );
            }
        }
        let password =
            e.password_file
                .as_ref()
                .and_then(|f| match std::fs::read_to_string(base.join(f)) {
                    Ok(p) => Some(p.trim().to_string()),
                    Err(err) => {
                        push(
                            "discovery.etcd.password_file",
                            format!("cannot read {f}: {err}"),
                            "create the file or fix the path",
                        );
                        None
                    }
                });
        if e.username.is_some() != e.password_file.is_some() {
            push(
                "discovery.etcd.username",
                "username and password_file go together".into(),
                "set both or neither",
            );
        }
        let file = |field: &str, v: &Option<String>, push: &mut dyn FnMut(&str, String, &str)| {
            v.as_ref().map(|f| {
                let p = base.join(f);
                if !p.is_file() {
                    push(
                        field,
                        format!("{} does not exist", p.display()),
                        "point it at a PEM file",
                    );
                }
                p
            })
        };
        let ca_file = file("discovery.etcd.ca_file", &e.ca_file, &mut push);
        if e.endpoints.iter().any(|ep| ep.starts_with("https://")) && ca_file.is_none() {
            push(
                "discovery.etcd.ca_file",
                "an https:// endpoint needs the CA that signed etcd's certificate".into(),
                "set `ca_file`",
            );
        }
        if e.cert_file.is_some() && ca_file.is_none() {
            push(
                "discovery.etcd.cert_file",
                "a client certificate is only used over TLS".into(),
                "set `ca_file` (and use https:// endpoints)",
            );
        }
        let cert_file = file("discovery.etcd.cert_file", &e.cert_file, &mut push);
        let key_file = file("discovery.etcd.key_file", &e.key_file, &mut push);
        if cert_file.is_some() != key_file.is_some() {
            push(
                "discovery.etcd.cert_file",
                "cert_file and key_file go together".into(),
                "set both for mutual TLS, or neither",
            );
        }
        let debounce = duration_field(
            &mut push,
            "discovery.etcd.debounce",
            &e.debounce,
            Duration::from_millis(5),
            "5ms",
        );
        let connect_timeout = duration_field(
            &mut push,
            "discovery.etcd.connect_timeout",
            &e.connect_timeout,
            Duration::from_secs(3),
            "5ms",
        );
        if connect_timeout.is_zero() {
            push(
                "discovery.etcd.connect_timeout",
                "must be longer than 0".into(),
                "write e.g. `3s`",
            );
        }
        EtcdSettings {
            endpoints: e.endpoints.clone(),
            prefix: normalize_prefix(e.prefix.as_deref().unwrap_or("/space/")),
            username: e.username.clone(),
            password,
            ca_file,
            cert_file,
            key_file,
            snapshot_file: e.snapshot_file.as_ref().map(|f| base.join(f)),
            debounce,
            connect_timeout,
        }
    });
    let dns = match &raw.discovery.dns {
        None => DnsSettings::default(),
        Some(d) => {
            let defaults = DnsSettings::default();
            let resolver = d.resolver.as_ref().and_then(|r| {
                r.parse::<SocketAddr>()
                    .or_else(|_| r.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| {
                        push(
                            "discovery.dns.resolver",
                            format!("`{r}` is not an IP or IP:PORT"),
                            "write e.g. `10.96.0.10` or `127.0.0.1:5353`",
                        )
                    })
                    .ok()
            });
            let min_interval = duration_field(
                &mut push,
                "discovery.dns.min_interval",
                &d.min_interval,
                defaults.min_interval,
                "1s",
            );
            let max_interval = duration_field(
                &mut push,
                "discovery.dns.max_interval",
                &d.max_interval,
                defaults.max_interval,
                "1s",
            );
            if min_interval.is_zero() {
                push(
                    "discovery.dns.min_interval",
                    "must be longer than 0".into(),
                    "write e.g. `1s`",
                );
            }
            if min_interval > max_interval {
                push(
                    "discovery.dns.min_interval",
                    "is longer than max_interval".into(),
                    "make min_interval <= max_interval",
                );
            }
            DnsSettings {
                resolver,
                min_interval,
                max_interval,
            }
        }
    };

    // [affinity]
    let affinity_keys = match &raw.affinity.key_file {
        None => AffinityKeys::generated(),
        Some(f) => match AffinityKeys::load(&base.join(f)) {
            Ok(k) => {
                // A rotated key changes every cookie: let the revision show it.
                hasher.update(k.source.as_bytes());
                hasher.update(std::fs::read(base.join(f)).unwrap_or_default());
                k
            }
            Err(e) => {
                push(
                    "affinity.key_file",
                    e,
                    "write one key per line, e.g. `openssl rand -hex 32 > affinity.key`; share the file with every replica",
                );
                AffinityKeys::generated()
            }
        },
    };

    // modules: inline, then the manifests directory
    let mut modules = Vec::new();
    let mut module_sources = Vec::new();
    for (i, m) in raw.modules.iter().enumerate() {
        let label = format!("module[{i}]");
        match validate_manifest(m) {
            Ok(spec) => {
                modules.push(spec);
                module_sources.push(format!("{file} {label}"));
            }
            Err(errs) => issues.extend(errs.into_iter().map(|e| ConfigIssue {
                file: file.clone(),
                issue: e.under(&label),
            })),
        }
    }
    let manifests_dir = raw.discovery.manifests_dir.as_ref().map(|d| base.join(d));
    if let Some(dir) = &manifests_dir {
        match manifest_files(dir) {
            Ok(files) => {
                for f in files {
                    let fname = f.display().to_string();
                    match std::fs::read_to_string(&f) {
                        Ok(t) => {
                            hasher.update(fname.as_bytes());
                            hasher.update(t.as_bytes());
                            match space_modules::parse_toml_manifest(&t, &fname) {
                                Ok(spec) => {
                                    modules.push(spec);
                                    module_sources.push(fname);
                                }
                                Err(e) => issues.extend(e.issues.into_iter().map(|issue| {
                                    ConfigIssue {
                                        file: fname.clone(),
                                        issue,
                                    }
                                })),
                            }
                        }
                        Err(e) => issues.push(ConfigIssue {
                            file: fname,
                            issue: Issue::new("", format!("cannot read: {e}"), "check permissions"),
                        }),
                    }
                }
            }
            Err(e) => issues.push(ConfigIssue {
                file: file.clone(),
                issue: Issue::new(
                    "discovery.manifests_dir",
                    format!("cannot read {}: {e}", dir.display()),
                    "create the directory or fix the path (relative paths are resolved beside the configuration file)",
                ),
            }),
        }
    }
    let refs: Vec<&ModuleSpec> = modules.iter().collect();
    for (i, why) in find_conflicts(&refs) {
        issues.push(ConfigIssue {
            file: module_sources[i].clone(),
            issue: Issue::new(
                "prefixes",
                why,
                "give each module its own prefix, or restrict one of them with `hosts`",
            ),
        });
    }

    if !issues.is_empty() {
        return Err(ConfigError { issues });
    }
    if raw.affinity.key_file.is_none() && modules.iter().any(|m| m.affinity.is_some()) {
        tracing::warn!(
            "modules use session affinity but [affinity].key_file is not set: routing cookies are signed with a key of this process only, so a restart or another replica re-pins every session. Share a key file between replicas"
        );
    }
    let revision = hex::encode(&hasher.finalize()[..6]);
    Ok(Config {
        path: path.to_path_buf(),
        server,
        listeners,
        tls,
        manifests_dir,
        etcd,
        dns,
        modules,
        module_sources,
        affinity_keys,
        revision,
    })
}

/// `*.toml` files directly in `dir`, sorted, skipping hidden files.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_config(text, Path::new("/etc/space/space.toml"))
    }

    #[test]
    fn full_config() {
        let c = parse(
            r#"
[server]
threads = 2
grace_period = "10s"
trusted_proxies = ["10.0.0.0/8", "192.0.2.7"]
[listeners]
http = "127.0.0.1:8080"
https = "127.0.0.1:8443"
admin = "127.0.0.1:9901"
redirect_to_https = true
[tls]
cert_dir = "certs"
hsts_max_age = "365d"
[[module]]
name = "core"
prefixes = ["/"]
[[module.instances]]
addr = "127.0.0.1:9000"
"#,
        )
        .unwrap();
        assert_eq!(c.server.threads, 2);
        assert!(c.server.is_trusted_proxy("10.1.2.3".parse().unwrap()));
        assert!(!c.server.is_trusted_proxy("11.1.2.3".parse().unwrap()));
        assert_eq!(c.tls.unwrap().cert_dir, Path::new("/etc/space/certs"));
        assert_eq!(c.modules.len(), 1);
    }

    #[test]
    fn errors_name_file_field_and_fix() {
        let err = parse(
            r#"
[server]
grace_period = "soon"
[listeners]
http = "localhost"
https = "127.0.0.1:8443"
[[module]]
name = "a"
prefixes = ["/x"]
[[module]]
name = "b"
prefixes = ["/x"]
[[module]]
name = "c"
prefixes = ["/c"]
[[module.instances]]
addr = "10.0.0.1"
"#,
        )
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "/etc/space/space.toml: server.grace_period",
            "/etc/space/space.toml: listeners.http",
            "/etc/space/space.toml: tls",
            "module[2].instances[0].addr",
            "overlaps module `a`",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(text.contains("fix:"));
    }

    #[test]
    fn unknown_section_key_is_refused_with_position() {
        let err = parse("[listeners]\nhttp = \"127.0.0.1:1\"\nhtps = \"x\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("line 3"), "{text}");
        assert!(text.contains("htps"), "{text}");
    }

    #[test]
    fn manifests_dir_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("modules.d")).unwrap();
        std::fs::write(
            dir.path().join("modules.d/labs.toml"),
            "name = \"labs\"\nprefixes = [\"/labs\"]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("modules.d/bad.toml"),
            "name = \"bad\"\nprefixes = [\"/b\"]\nmax_body_size = \"huge\"\n",
        )
        .unwrap();
        let cfg = dir.path().join("space.toml");
        let text =
            "[listeners]\nhttp = \"127.0.0.1:1\"\n[discovery]\nmanifests_dir = \"modules.d\"\n";
        let err = parse_config(text, &cfg).unwrap_err().to_string();
        assert!(err.contains("modules.d/bad.toml: max_body_size"), "{err}");
        std::fs::remove_file(dir.path().join("modules.d/bad.toml")).unwrap();
        let c = parse_config(text, &cfg).unwrap();
        assert_eq!(c.modules[0].name.as_str(), "labs");
    }
}
