//! `space module register|list|drain|deregister`: module registration in etcd.
//!
//! The keys live under a prefix (default `/space/`, see [`space_registry::etcd_keys`]):
//! - `modules/<module>`: the module manifest as JSON (the standalone TOML manifest, validated
//!   and converted). It is written **without a lease**: several registrars (one per container
//!   of the module) share one module key, and the module must not vanish when one of them
//!   dies. Remove it with `space module deregister MODULE`.
//! - `instances/<module>/<id>`: `{"addr": "10.0.0.9:80", "weight": 1, "draining": false}`,
//!   written **under the registrar's lease**, so that it disappears by itself (after the lease
//!   TTL) when the registrar is killed or loses etcd for good.
//!
//! `space module register` is meant to run as a sidecar or beside the module's process:
//! it validates the manifest and the instance, refuses a prefix another module already
//! routes (unless `--force`), grants a lease of `--ttl` and writes both keys in one
//! transaction, prints one line, then renews the lease every TTL/3. While etcd is unreachable
//! it logs and retries with backoff and never exits; if the lease expired meanwhile it grants
//! a new one and writes the instance again (and the manifest, only if the module key is gone,
//! so that an older registrar never reverts a newer manifest). On SIGTERM or SIGINT it marks
//! the instance `"draining": true` (same lease), keeps renewing for `--drain-period` (a second
//! signal ends that wait early), deletes the instance key, revokes the lease and exits 0.
//! The default instance id is `<hostname>-<port>` (e.g. `labs-7f9c-80`), or the address when
//! the hostname cannot be read. Logs go to stderr; nothing is interactive.
//!
//! Exit codes: 0 done; 1 refused (invalid manifest, instance or option, overlapping prefix,
//! nothing to drain or deregister); 2 etcd (or the admin endpoint) could not be reached or
//! failed (clap also uses 2 for usage errors).
use std::{
    collections::BTreeMap,
    fmt::Display,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Args, Subcommand};
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp, TxnOpResponse,
};
use serde_json::{json, Value};
use space_modules::{
    parse_json_manifest, parse_toml_manifest, validate_instance, ModuleSpec, RawInstance,
    RawManifest,
};
use space_registry::{
    etcd_keys::{self, EtcdKey},
    EtcdSettings,
};
use tracing::{info, warn};

/// How long one etcd request (or the admin request of `list`) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// First and largest pause between retries while etcd is unreachable.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// `space module ...`: the options shared by every subcommand, and the subcommand.
#[derive(Debug, Args)]
pub struct ModuleArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(subcommand)]
    pub command: ModuleCommand,
}

/// Where etcd is and how to talk to it (every `space module` subcommand).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "etcd connection (every `space module` subcommand)")]
pub struct EtcdArgs {
    /// etcd client URL(s); repeat the flag or separate with commas.
    #[arg(
        long = "etcd",
        value_name = "URL",
        env = "SPACE_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379",
        global = true
    )]
    pub endpoints: Vec<String>,
    /// Prefix of SPACE's keys in etcd (the proxies' `[discovery.etcd] prefix`).
    #[arg(
        long,
        value_name = "PREFIX",
        env = "SPACE_ETCD_PREFIX",
        default_value = "/space/",
        global = true
    )]
    pub prefix: String,
    /// CA certificate (PEM) that signed etcd's certificate; use with https:// URLs.
    #[arg(long, value_name = "FILE", env = "SPACE_ETCD_CA", global = true)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's mutual TLS; needs --etcd-key and --etcd-ca.
    #[arg(long, value_name = "FILE", env = "SPACE_ETCD_CERT", global = true)]
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert.
    #[arg(long, value_name = "FILE", env = "SPACE_ETCD_KEY", global = true)]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (with authentication enabled); needs --etcd-password-file.
    #[arg(long, value_name = "USER", env = "SPACE_ETCD_USER", global = true)]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password (a trailing newline is ignored).
    #[arg(
        long,
        value_name = "FILE",
        env = "SPACE_ETCD_PASSWORD_FILE",
        global = true
    )]
    pub etcd_password_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ModuleCommand {
    /// Register this instance of a module in etcd and keep it registered until SIGTERM/SIGINT.
    ///
    /// Validates the manifest (TOML) and the instance, refuses a prefix that another registered
    /// module already routes (unless --force), then, in one etcd transaction, writes
    /// `<prefix>modules/<name>` (the manifest as JSON) and `<prefix>instances/<name>/<id>`
    /// (`{"addr", "weight", "draining"}`), and prints one line saying what it registered.
    ///
    /// The instance key is under a lease of --ttl, renewed every TTL/3: if this process dies,
    /// the instance disappears after the TTL. The module key is NOT under the lease, because
    /// all the registrars of a module share it and the module must not vanish when one of them
    /// dies; remove it with `space module deregister MODULE`.
    ///
    /// While etcd is unreachable the registrar logs and retries with backoff, and never exits;
    /// if the lease expired meanwhile, it registers the instance again under a new lease.
    ///
    /// On SIGTERM or SIGINT: the instance is marked `"draining": true` (no new sessions, pinned
    /// ones stay), kept for --drain-period (a second signal cuts it short), then deleted and
    /// the lease revoked; exit 0. Under Kubernetes, set terminationGracePeriodSeconds above the
    /// drain period.
    ///
    /// Exit codes: 1 invalid manifest, instance or option, or overlapping prefix; 2 etcd
    /// unreachable at start.
    Register(RegisterArgs),
    /// List the modules and instances registered in etcd (with --admin, also their health as a
    /// running proxy sees it).
    List(ListArgs),
    /// Mark an instance draining (no new sessions; pinned sessions stay until the module's
    /// drain timeout), keeping its lease.
    Drain {
        /// Module name.
        module: String,
        /// Instance id (see `space module list`).
        id: String,
    },
    /// Delete one instance, or (without ID) the module's manifest and all its instances.
    ///
    /// A registrar still running for a deleted instance keeps its lease and writes the
    /// instance again when it drains or when its lease expires: stop it too.
    Deregister {
        /// Module name.
        module: String,
        /// Instance id; without it the module key and every instance of the module go.
        id: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Module manifest (TOML), e.g. modules/labs.toml.
    #[arg(long, value_name = "FILE", env = "SPACE_MODULE_MANIFEST")]
    pub manifest: PathBuf,
    /// Address the proxy sends this instance's traffic to: IP:PORT (e.g. the pod IP).
    #[arg(long, value_name = "IP:PORT", env = "SPACE_MODULE_ADDR")]
    pub addr: String,
    /// Instance id, stable for the instance's life (affinity cookies are keyed on it).
    /// Default: `<hostname>-<port>`, or the address if the hostname cannot be read.
    #[arg(long, value_name = "ID", env = "SPACE_MODULE_ID")]
    pub id: Option<String>,
    /// Load-balancing weight, 1 to 1000.
    #[arg(long, value_name = "N", default_value = "1")]
    pub weight: String,
    /// Lease TTL (whole seconds, at least 1s; etcd may raise it to its minimum): how long the
    /// instance outlives this process if it is killed. Renewed every TTL/3.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub ttl: String,
    /// How long the instance stays registered as draining after SIGTERM/SIGINT.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub drain_period: String,
    /// Register even if a prefix overlaps another module's (the proxies then keep the module
    /// created first and refuse the other until the overlap is gone).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// A running proxy's admin URL (e.g. http://127.0.0.1:9901): adds each instance's health,
    /// requests in flight and request count from its `/api/instances`.
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,
    /// Bearer token of the admin endpoint (required when it listens beyond loopback).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "SPACE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Why a command stopped: exit 1 (refused) or exit 2 (etcd or admin unreachable / failed).
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

fn refused(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

fn down(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

/// Runs `space module ...`; the `space` command line calls this.
pub fn run(args: ModuleArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("space module: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ModuleArgs { etcd, command } = args;
    let result = runtime.block_on(async move {
        match command {
            ModuleCommand::Register(a) => register(&etcd, a).await,
            ModuleCommand::List(a) => list(&etcd, a).await,
            ModuleCommand::Drain { module, id } => drain(&etcd, &module, &id).await,
            ModuleCommand::Deregister { module, id } => {
                deregister(&etcd, &module, id.as_deref()).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("{}", f.message);
            ExitCode::from(f.code)
        }
    }
}

// ---------------------------------------------------------------------------------------
// etcd connection

/// Builds the etcd settings from the flags, checking the files they name.
fn settings(a: &EtcdArgs) -> Result<EtcdSettings, Failure> {
    let endpoints: Vec<String> = a
        .endpoints
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect();
    if endpoints.is_empty() {
        return Err(refused(
            "--etcd: no endpoint given (fix: --etcd http://HOST:2379, repeated or comma-separated, or SPACE_ETCD_ENDPOINTS)",
        ));
    }
    if a.prefix.trim().is_empty() {
        return Err(refused(
            "--prefix: empty (fix: use the proxies' [discovery.etcd] prefix, default /space/)",
        ));
    }
    let mut s = EtcdSettings::new(endpoints, a.prefix.trim());
    let readable = |flag: &str, path: &PathBuf| -> Result<(), Failure> {
        std::fs::metadata(path).map(|_| ()).map_err(|e| {
            refused(format!(
                "{flag}: cannot read {}: {e} (fix: give the path of a readable PEM file)",
                path.display()
            ))
        })
    };
    if let Some(ca) = &a.etcd_ca {
        readable("--etcd-ca", ca)?;
        if let Some(plain) = s.endpoints.iter().find(|e| e.starts_with("http://")) {
            return Err(refused(format!(
                "--etcd-ca is given but endpoint {plain} is plain http (fix: use https:// URLs with TLS, or drop the TLS options)"
            )));
        }
        s.ca_file = Some(ca.clone());
    }
    match (&a.etcd_cert, &a.etcd_key) {
        (Some(cert), Some(key)) => {
            if a.etcd_ca.is_none() {
                return Err(refused(
                    "--etcd-cert needs --etcd-ca (fix: give the CA that signed etcd's certificate)",
                ));
            }
            readable("--etcd-cert", cert)?;
            readable("--etcd-key", key)?;
            s.cert_file = Some(cert.clone());
            s.key_file = Some(key.clone());
        }
        (None, None) => {}
        _ => {
            return Err(refused(
                "--etcd-cert and --etcd-key go together (fix: give both, or neither)",
            ))
        }
    }
    match (&a.etcd_user, &a.etcd_password_file) {
        (Some(user), Some(file)) => {
            let password = std::fs::read_to_string(file).map_err(|e| {
                refused(format!(
                    "--etcd-password-file: cannot read {}: {e} (fix: give a readable file holding the password)",
                    file.display()
                ))
            })?;
            s.username = Some(user.clone());
            s.password = Some(password.trim_end_matches(['\r', '\n']).to_string());
        }
        (None, None) => {}
        (Some(_), None) => return Err(refused(
            "--etcd-user needs --etcd-password-file (fix: put the password in a file and name it)",
        )),
        (None, Some(_)) => {
            return Err(refused(
                "--etcd-password-file needs --etcd-user (fix: name the etcd user)",
            ))
        }
    }
    Ok(s)
}

fn unreachable_message(s: &EtcdSettings, why: &str) -> String {
    format!(
        "cannot reach etcd at {}: {why}\n  check that etcd is running and listening on that client URL (usually port 2379), \
         that this host can reach it (firewall, network policy, DNS), and that --etcd (or SPACE_ETCD_ENDPOINTS) names it; \
         for TLS give https:// URLs and --etcd-ca (and --etcd-cert/--etcd-key), for authentication --etcd-user and --etcd-password-file",
        s.endpoints.join(",")
    )
}

/// Awaits an etcd request for at most [`REQUEST_TIMEOUT`], describing a failure.
async fn within<T, E: Display>(
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer within {}s",
            REQUEST_TIMEOUT.as_secs()
        )),
    }
}

/// Connects and makes one read under the prefix, so that an unreachable etcd shows now
/// (the client connects lazily). Failures exit 2.
async fn connect(s: &EtcdSettings) -> Result<Client, Failure> {
    let mut client = within("connecting", etcd_keys::connect(s))
        .await
        .map_err(|e| down(unreachable_message(s, &e)))?;
    within(
        "reading",
        client.get(
            s.prefix.as_str(),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_limit(1),
            ),
        ),
    )
    .await
    .map_err(|e| down(unreachable_message(s, &e)))?;
    Ok(client)
}

fn etcd_failed(s: &EtcdSettings, e: String) -> Failure {
    down(format!("etcd at {}: {e}", s.endpoints.join(",")))
}

// ---------------------------------------------------------------------------------------
// register

/// The value of an instance key.
#[derive(Debug, Clone)]
struct InstanceValue {
    addr: String,
    weight: u32,
    draining: bool,
}

impl InstanceValue {
    fn json(&self) -> String {
        json!({ "addr": self.addr, "weight": self.weight, "draining": self.draining }).to_string()
    }
}

/// The hostname, if it can be read and is usable in an instance id.
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes; we read at most up to the first
    // NUL or the buffer's end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim();
    let usable = !name.is_empty()
        && name.len() <= 100
        && !name.bytes().any(|b| b <= b' ' || b == b'/' || b == 0x7f);
    usable.then(|| name.to_string())
}

/// `<hostname>-<port>`, or the address if the hostname is unavailable (or the address bad).
fn default_id(addr: &str) -> String {
    match (addr.parse::<SocketAddr>(), hostname()) {
        (Ok(a), Some(host)) => format!("{host}-{}", a.port()),
        _ => addr.to_string(),
    }
}

fn parse_seconds(flag: &str, text: &str) -> Result<Duration, Failure> {
    space_modules::parse_duration(text)
        .map_err(|e| refused(format!("{flag}: {e} (fix: write a duration such as `10s`)")))
}

async fn register(etcd: &EtcdArgs, a: RegisterArgs) -> Result<(), Failure> {
    // 1. The manifest and the instance, before touching etcd.
    let source = a.manifest.display().to_string();
    let text = std::fs::read_to_string(&a.manifest).map_err(|e| {
        refused(format!(
            "{source}: cannot read the manifest: {e} (fix: check the path given to --manifest)"
        ))
    })?;
    let spec = parse_toml_manifest(&text, &source).map_err(|e| {
        refused(format!(
            "{} problem(s) in the manifest; nothing was registered:\n{e}",
            e.issues.len()
        ))
    })?;
    let raw: RawManifest = toml::from_str(&text).map_err(|e| refused(format!("{source}: {e}")))?;
    let module_json = serde_json::to_string(&raw)
        .map_err(|e| refused(format!("{source}: cannot convert to JSON: {e}")))?;
    let name = spec.name.as_str().to_string();

    let weight: u32 = a.weight.trim().parse().map_err(|_| {
        refused(format!(
            "--weight: `{}` is not a whole number (fix: use a weight from 1 to 1000)",
            a.weight
        ))
    })?;
    let id = a.id.clone().unwrap_or_else(|| default_id(a.addr.trim()));
    let raw_instance = RawInstance {
        id: Some(id.clone()),
        addr: a.addr.trim().to_string(),
        weight: Some(weight),
        draining: false,
    };
    let instance = validate_instance(&raw_instance).map_err(|issues| {
        let lines: Vec<String> = issues
            .iter()
            .map(|i| format!("  --{}: {} (fix: {})", i.field, i.problem, i.fix))
            .collect();
        refused(format!(
            "the instance is not valid; nothing was registered:\n{}",
            lines.join("\n")
        ))
    })?;
    let ttl = parse_seconds("--ttl", &a.ttl)?;
    if ttl < Duration::from_secs(1) {
        return Err(refused(format!(
            "--ttl: {} is shorter than 1s (fix: use a TTL of a few seconds, e.g. 10s)",
            a.ttl
        )));
    }
    let ttl_secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    let drain_period = parse_seconds("--drain-period", &a.drain_period)?;
    let settings = settings(etcd)?;

    // Signals first: one arriving during registration drains right after it.
    let mut signals = Signals::new()
        .map_err(|e| refused(format!("cannot install the SIGTERM/SIGINT handlers: {e}")))?;

    // 2. etcd, and the other modules' prefixes.
    let mut client = connect(&settings).await?;
    let prefix = settings.prefix.clone();
    let module_key = etcd_keys::module_key(&prefix, &name);
    let instance_key = etcd_keys::instance_key(&prefix, &name, instance.id.as_str());
    let modules = within(
        "reading the registered modules",
        client.get(
            etcd_keys::modules_prefix(&prefix),
            Some(GetOptions::new().with_prefix()),
        ),
    )
    .await
    .map_err(|e| etcd_failed(&settings, e))?;
    let mut others: Vec<ModuleSpec> = Vec::new();
    for kv in modules.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let Some(rest) = key.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let EtcdKey::Module { module } = etcd_keys::parse_key(rest) else {
            continue;
        };
        if module != name {
            match parse_json_manifest(&String::from_utf8_lossy(kv.value()), &key) {
                Ok(other) => others.push(other),
                Err(e) => warn!("not checking overlaps with an invalid manifest: {e}"),
            }
        } else if kv.value() != module_json.as_bytes() {
            info!(key = %key, "replacing the module's manifest in etcd with {source}");
        }
    }
    let overlaps = overlaps_with(&spec, &others);
    if !overlaps.is_empty() {
        let list = overlaps.join("\n  ");
        if a.force {
            warn!("registering anyway (--force): {list}");
        } else {
            return Err(refused(format!(
                "refusing to register module `{name}`; nothing was registered:\n  {list}\n  \
                 (fix: give module `{name}` another prefix in {source}, deregister the other module \
                 with `space module deregister MODULE`, or pass --force; the proxies then keep the \
                 module created first and refuse the other)"
            )));
        }
    }
    let existing = within(
        "reading the instance key",
        client.get(instance_key.as_str(), None),
    )
    .await
    .map_err(|e| etcd_failed(&settings, e))?;
    if let Some(kv) = existing.kvs().first() {
        warn!(
            key = %instance_key,
            lease = %format!("{:x}", kv.lease()),
            "the instance key exists already (a previous run whose lease has not expired yet, or \
             another registrar with the same --id); replacing it"
        );
    }

    // 3. Lease, one transaction, one line.
    let mut reg = Registrar {
        client,
        module_key,
        module_json,
        instance_key,
        value: InstanceValue {
            addr: instance.addr.to_string(),
            weight: instance.weight,
            draining: false,
        },
        ttl: ttl_secs as i64,
        lease: 0,
        granted: ttl_secs as i64,
        keeper: None,
        dirty: false,
        failing: false,
        last_renewed: Instant::now(),
        backoff: BACKOFF_START,
    };
    reg.grant_and_write(true)
        .await
        .map_err(|e| etcd_failed(&settings, e))?;
    let prefixes: Vec<&str> = spec.prefixes.iter().map(|p| p.as_str()).collect();
    println!(
        "registered instance `{}` ({}, weight {}) of module `{name}` (prefixes {}) in etcd at {}: \
         {} under lease {:x} (ttl {}s), {} without a lease",
        instance.id,
        instance.addr,
        instance.weight,
        prefixes.join(", "),
        settings.endpoints.join(","),
        reg.instance_key,
        reg.lease,
        reg.granted,
        reg.module_key,
    );
    info!(
        "renewing the lease every {:?}; SIGTERM or SIGINT marks the instance draining for {} and then deregisters it",
        reg.interval(),
        humantime::format_duration(drain_period)
    );

    // 4. Keep alive until a signal.
    let signal = match reg.maintain(&mut signals, None).await {
        Stop::Signal(s) => s,
        Stop::Deadline => unreachable!("no deadline while running"),
    };
    let drain_deadline = Instant::now() + drain_period;
    info!(
        "{signal}: marking instance `{}` draining for {}",
        instance.id,
        humantime::format_duration(drain_period)
    );

    // 5. Drain, wait, deregister.
    reg.value.draining = true;
    reg.dirty = true;
    let first = reg.tick().await;
    if !reg.dirty {
        info!(key = %reg.instance_key, "marked draining in etcd");
    }
    if let Stop::Signal(s) = reg
        .maintain_from(&mut signals, Some(drain_deadline), first)
        .await
    {
        info!("{s} again: ending the drain period early");
    }
    reg.deregister().await;
    Ok(())
}

/// Reasons `spec` cannot share the route table with each of `others`.
fn overlaps_with(spec: &ModuleSpec, others: &[ModuleSpec]) -> Vec<String> {
    others
        .iter()
        .flat_map(|other| space_registry::find_conflicts(&[other, spec]))
        .map(|(_, why)| why)
        .collect()
}

/// SIGTERM and SIGINT.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

enum Stop {
    Signal(&'static str),
    Deadline,
}

/// What a successful round did.
enum Round {
    Renewed,
    Reregistered,
}

/// Holds a registration: the lease, its keep-alive stream and the instance value.
struct Registrar {
    client: Client,
    module_key: String,
    module_json: String,
    instance_key: String,
    value: InstanceValue,
    /// Requested TTL, seconds.
    ttl: i64,
    lease: i64,
    /// TTL etcd granted (it may raise a small one to its minimum).
    granted: i64,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// The instance value changed and must be written again.
    dirty: bool,
    /// Renewals are failing (the next success logs the recovery).
    failing: bool,
    /// When etcd last confirmed the registration.
    last_renewed: Instant,
    backoff: Duration,
}

fn lease_gone(error: &str) -> bool {
    error.contains("lease not found")
}

impl Registrar {
    /// Renewal period: a third of the granted TTL.
    fn interval(&self) -> Duration {
        let ms = u64::try_from(self.granted.max(1)).unwrap_or(1) * 1000 / 3;
        Duration::from_millis(ms).max(Duration::from_millis(100))
    }

    /// Grants a new lease and writes the instance under it, with the manifest in the same
    /// transaction: always when `overwrite_module`, else only if the module key is missing
    /// (so an old registrar never reverts a newer manifest).
    async fn grant_and_write(&mut self, overwrite_module: bool) -> Result<(), String> {
        let lease = within("granting a lease", self.client.lease_grant(self.ttl, None)).await?;
        let put_instance = || {
            TxnOp::put(
                self.instance_key.as_str(),
                self.value.json(),
                Some(PutOptions::new().with_lease(lease.id())),
            )
        };
        let put_module = TxnOp::put(self.module_key.as_str(), self.module_json.as_str(), None);
        let txn = if overwrite_module {
            Txn::new().and_then(vec![put_module, put_instance()])
        } else {
            Txn::new()
                .when(vec![Compare::version(
                    self.module_key.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then(vec![put_module, put_instance()])
                .or_else(vec![put_instance()])
        };
        if let Err(e) = within("writing the module and instance keys", self.client.txn(txn)).await {
            let _ =
                tokio::time::timeout(REQUEST_TIMEOUT, self.client.lease_revoke(lease.id())).await;
            return Err(e);
        }
        self.lease = lease.id();
        self.granted = lease.ttl();
        self.last_renewed = Instant::now();
        self.keeper = None;
        self.dirty = false;
        Ok(())
    }

    /// One round: write the instance if it changed, renew the lease; register again under a
    /// new lease if the old one is gone.
    async fn round(&mut self) -> Result<Round, String> {
        if self.dirty {
            let put = self.client.put(
                self.instance_key.as_str(),
                self.value.json(),
                Some(PutOptions::new().with_lease(self.lease)),
            );
            match within("writing the instance key", put).await {
                Ok(_) => self.dirty = false,
                Err(e) if lease_gone(&e) => {
                    self.grant_and_write(false).await?;
                    return Ok(Round::Reregistered);
                }
                Err(e) => return Err(e),
            }
        }
        let Some((keeper, stream)) = self.keeper.as_mut() else {
            // Opening the stream renews once (etcd-client reads the first answer).
            return match within(
                "opening the lease keep-alive stream",
                self.client.lease_keep_alive(self.lease),
            )
            .await
            {
                Ok(k) => {
                    self.keeper = Some(k);
                    Ok(Round::Renewed)
                }
                Err(e) if lease_gone(&e) => {
                    self.grant_and_write(false).await?;
                    Ok(Round::Reregistered)
                }
                Err(e) => Err(e),
            };
        };
        let renewal = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        match within("renewing the lease", renewal).await {
            Ok(Some(resp)) if resp.ttl() > 0 => Ok(Round::Renewed),
            Ok(Some(_)) => {
                self.keeper = None;
                self.grant_and_write(false).await?;
                Ok(Round::Reregistered)
            }
            Ok(None) => {
                self.keeper = None;
                Err("renewing the lease: etcd closed the keep-alive stream".to_string())
            }
            Err(e) => {
                self.keeper = None;
                Err(e)
            }
        }
    }

    /// Runs one round, logs what changed, and returns how long to wait before the next.
    async fn tick(&mut self) -> Duration {
        match self.round().await {
            Ok(round) => {
                if std::mem::take(&mut self.failing) {
                    info!(
                        "etcd answers again (the previous renewal was {}s ago)",
                        self.last_renewed.elapsed().as_secs()
                    );
                }
                self.last_renewed = Instant::now();
                if let Round::Reregistered = round {
                    warn!(
                        key = %self.instance_key,
                        "the lease had expired and etcd removed the instance; registered it again under lease {:x}",
                        self.lease
                    );
                }
                self.backoff = BACKOFF_START;
                self.interval()
            }
            Err(e) => {
                self.failing = true;
                let wait = self.backoff;
                warn!(
                    "cannot renew the registration ({e}); retrying in {wait:?} (last renewal {}s ago; \
                     etcd removes the instance {}s after the last renewal, and it is registered again once etcd answers)",
                    self.last_renewed.elapsed().as_secs(),
                    self.granted
                );
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                wait
            }
        }
    }

    /// Keeps the registration until a signal or `deadline`, first round now-ish.
    async fn maintain(&mut self, signals: &mut Signals, deadline: Option<Instant>) -> Stop {
        let first = self.interval();
        self.maintain_from(signals, deadline, first).await
    }

    /// Like [`Registrar::maintain`], with the first round after `wait`.
    async fn maintain_from(
        &mut self,
        signals: &mut Signals,
        deadline: Option<Instant>,
        mut wait: Duration,
    ) -> Stop {
        loop {
            let mut next = Instant::now() + wait;
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    return Stop::Deadline;
                }
                next = next.min(d);
            }
            tokio::select! {
                s = signals.recv() => return Stop::Signal(s),
                _ = tokio::time::sleep_until(next.into()) => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Stop::Deadline;
            }
            wait = self.tick().await;
        }
    }

    /// Deletes the instance key (if still ours) and revokes the lease; logs failures, which
    /// the lease's expiry makes good.
    async fn deregister(&mut self) {
        self.keeper = None;
        let txn = Txn::new()
            .when(vec![Compare::lease(
                self.instance_key.as_str(),
                CompareOp::Equal,
                self.lease,
            )])
            .and_then(vec![TxnOp::delete(self.instance_key.as_str(), None)]);
        match within("deleting the instance key", self.client.txn(txn)).await {
            Ok(r) if r.succeeded() => info!(key = %self.instance_key, "deleted the instance"),
            Ok(_) => info!(
                key = %self.instance_key,
                "the instance key is gone or belongs to another lease; left it alone"
            ),
            Err(e) => warn!(
                "{e}; etcd removes it when the lease expires (within {}s)",
                self.granted
            ),
        }
        match within("revoking the lease", self.client.lease_revoke(self.lease)).await {
            Ok(_) => info!("revoked lease {:x}; deregistered", self.lease),
            Err(e) if lease_gone(&e) => info!("lease {:x} had already expired", self.lease),
            Err(e) => warn!("{e}; it expires within {}s", self.granted),
        }
    }
}

// ---------------------------------------------------------------------------------------
// drain, deregister

async fn drain(etcd: &EtcdArgs, module: &str, id: &str) -> Result<(), Failure> {
    let settings = settings(etcd)?;
    let mut client = connect(&settings).await?;
    let key = etcd_keys::instance_key(&settings.prefix, module, id);
    for _ in 0..5 {
        let got = within("reading the instance key", client.get(key.as_str(), None))
            .await
            .map_err(|e| etcd_failed(&settings, e))?;
        let Some(kv) = got.kvs().first() else {
            return Err(refused(format!(
                "no instance `{id}` of module `{module}` in etcd: {key} does not exist \
                 (fix: check the names with `space module list`; a static instance from a manifest is drained in its file)"
            )));
        };
        let mut value: Value = serde_json::from_slice(kv.value()).map_err(|e| {
            refused(format!(
                "{key} does not hold instance JSON ({e}); fix: write {{\"addr\": \"10.0.0.5:80\", \"weight\": 1, \"draining\": false}}"
            ))
        })?;
        let Some(object) = value.as_object_mut() else {
            return Err(refused(format!(
                "{key} does not hold a JSON object; fix: write {{\"addr\": \"10.0.0.5:80\", \"weight\": 1, \"draining\": false}}"
            )));
        };
        let addr = object
            .get("addr")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        if object.get("draining") == Some(&Value::Bool(true)) {
            println!("instance `{id}` of module `{module}` ({addr}) is already draining");
            return Ok(());
        }
        object.insert("draining".into(), Value::Bool(true));
        let options = if kv.lease() != 0 {
            PutOptions::new().with_lease(kv.lease())
        } else {
            PutOptions::new()
        };
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then(vec![TxnOp::put(
                key.as_str(),
                value.to_string(),
                Some(options),
            )]);
        match within("writing the instance key", client.txn(txn)).await {
            Ok(r) if r.succeeded() => {
                println!(
                    "instance `{id}` of module `{module}` ({addr}) is now draining: no new sessions; \
                     pinned sessions stay until the module's drain timeout"
                );
                return Ok(());
            }
            // Changed between read and write: read again.
            Ok(_) => continue,
            Err(e) if lease_gone(&e) => {
                return Err(refused(format!(
                    "instance `{id}` of module `{module}` went away while draining it (its lease expired)"
                )))
            }
            Err(e) => return Err(etcd_failed(&settings, e)),
        }
    }
    Err(etcd_failed(
        &settings,
        format!("{key} kept changing while marking it draining; try again"),
    ))
}

async fn deregister(etcd: &EtcdArgs, module: &str, id: Option<&str>) -> Result<(), Failure> {
    let settings = settings(etcd)?;
    let mut client = connect(&settings).await?;
    let prefix = &settings.prefix;
    match id {
        Some(id) => {
            let key = etcd_keys::instance_key(prefix, module, id);
            let deleted = within(
                "deleting the instance key",
                client.delete(key.as_str(), None),
            )
            .await
            .map_err(|e| etcd_failed(&settings, e))?
            .deleted();
            if deleted == 0 {
                return Err(refused(format!(
                    "no instance `{id}` of module `{module}` in etcd: {key} does not exist \
                     (fix: check the names with `space module list`)"
                )));
            }
            println!("deregistered instance `{id}` of module `{module}` ({key})");
        }
        None => {
            let module_key = etcd_keys::module_key(prefix, module);
            let instances = etcd_keys::instances_prefix(prefix, module);
            let txn = Txn::new().and_then(vec![
                TxnOp::delete(module_key.as_str(), None),
                TxnOp::delete(instances.as_str(), Some(DeleteOptions::new().with_prefix())),
            ]);
            let response = within("deleting the module", client.txn(txn))
                .await
                .map_err(|e| etcd_failed(&settings, e))?;
            let counts: Vec<i64> = response
                .op_responses()
                .iter()
                .map(|r| match r {
                    TxnOpResponse::Delete(d) => d.deleted(),
                    _ => 0,
                })
                .collect();
            let (manifest, instances_deleted) = (
                counts.first().copied().unwrap_or(0),
                counts.get(1).copied().unwrap_or(0),
            );
            if manifest + instances_deleted == 0 {
                return Err(refused(format!(
                    "nothing registered for module `{module}` in etcd: neither {module_key} nor keys under {instances} exist \
                     (fix: check the name with `space module list`)"
                )));
            }
            println!(
                "deregistered module `{module}`: {} manifest key and {instances_deleted} instance key(s) deleted",
                if manifest > 0 { "its" } else { "no" }
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// list

#[derive(Debug, Default)]
struct ModuleRow {
    /// The module key exists.
    registered: bool,
    prefixes: Vec<String>,
    hosts: Vec<String>,
    manifest_error: Option<String>,
    instances: BTreeMap<String, InstanceRow>,
}

#[derive(Debug)]
struct InstanceRow {
    addr: String,
    weight: u64,
    draining: bool,
    /// `etcd` (an instance key), `manifest` (a static instance of the manifest) or `proxy`
    /// (known to the proxy only).
    source: &'static str,
    /// Lease of the instance key (0 = none).
    lease: i64,
    problem: Option<String>,
    proxy: Option<Value>,
}

async fn list(etcd: &EtcdArgs, a: ListArgs) -> Result<(), Failure> {
    let settings = settings(etcd)?;
    let mut client = connect(&settings).await?;
    let prefix = settings.prefix.clone();
    let all = within(
        "reading the registrations",
        client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await
    .map_err(|e| etcd_failed(&settings, e))?;
    let revision = all.header().map(|h| h.revision()).unwrap_or_default();
    let mut modules: BTreeMap<String, ModuleRow> = BTreeMap::new();
    for kv in all.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let value = String::from_utf8_lossy(kv.value()).into_owned();
        let Some(rest) = key.strip_prefix(prefix.as_str()) else {
            continue;
        };
        match etcd_keys::parse_key(rest) {
            EtcdKey::Module { module } => {
                let row = modules.entry(module.to_string()).or_default();
                row.registered = true;
                match serde_json::from_str::<RawManifest>(&value) {
                    Ok(raw) => {
                        row.prefixes = raw.prefixes.clone();
                        row.hosts = raw.hosts.clone();
                        for inst in &raw.instances {
                            let id = inst.id.clone().unwrap_or_else(|| inst.addr.clone());
                            row.instances.insert(
                                id,
                                InstanceRow {
                                    addr: inst.addr.clone(),
                                    weight: u64::from(inst.weight.unwrap_or(1)),
                                    draining: inst.draining,
                                    source: "manifest",
                                    lease: 0,
                                    problem: None,
                                    proxy: None,
                                },
                            );
                        }
                    }
                    Err(e) => row.manifest_error = Some(e.to_string()),
                }
                if row.manifest_error.is_none() {
                    if let Err(e) = parse_json_manifest(&value, &key) {
                        row.manifest_error = Some(e.to_string());
                    }
                }
            }
            EtcdKey::Instance { module, id } => {
                let row = modules.entry(module.to_string()).or_default();
                let parsed: Result<Value, _> = serde_json::from_str(&value);
                let (addr, weight, draining, problem) = match &parsed {
                    Ok(v) if v.is_object() => (
                        v["addr"].as_str().unwrap_or("").to_string(),
                        v["weight"].as_u64().unwrap_or(1),
                        v["draining"].as_bool().unwrap_or(false),
                        None,
                    ),
                    Ok(_) => (String::new(), 0, false, Some("not a JSON object".into())),
                    Err(e) => (String::new(), 0, false, Some(format!("not JSON: {e}"))),
                };
                row.instances.insert(
                    id.to_string(),
                    InstanceRow {
                        addr,
                        weight,
                        draining,
                        source: "etcd",
                        lease: kv.lease(),
                        problem,
                        proxy: None,
                    },
                );
            }
            EtcdKey::Other => {}
        }
    }

    if let Some(admin) = &a.admin {
        let seen = fetch_admin_instances(admin, a.admin_token.as_deref()).await?;
        for inst in seen {
            let module = inst["module"].as_str().unwrap_or_default().to_string();
            let id = inst["id"].as_str().unwrap_or_default().to_string();
            // Only modules registered in etcd: the file's static modules are not ours to list.
            let Some(row) = modules.get_mut(&module) else {
                continue;
            };
            let entry = row.instances.entry(id).or_insert_with(|| InstanceRow {
                addr: inst["addr"].as_str().unwrap_or_default().to_string(),
                weight: inst["weight"].as_u64().unwrap_or(1),
                draining: inst["draining"].as_bool().unwrap_or(false),
                source: "proxy",
                lease: 0,
                problem: None,
                proxy: None,
            });
            entry.proxy = Some(inst);
        }
    }

    if a.json {
        let out = list_json(&prefix, revision, &modules, a.admin.is_some());
        println!(
            "{}",
            serde_json::to_string_pretty(&out).unwrap_or_else(|_| out.to_string())
        );
    } else if modules.is_empty() {
        println!(
            "no modules registered under {prefix} in etcd at {}",
            settings.endpoints.join(",")
        );
    } else {
        print!("{}", list_text(&modules, a.admin.is_some()));
    }
    Ok(())
}

/// `GET <admin>/api/instances` → its `instances` array.
async fn fetch_admin_instances(admin: &str, token: Option<&str>) -> Result<Vec<Value>, Failure> {
    let base = if admin.contains("://") {
        admin.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", admin.trim_end_matches('/'))
    };
    let url = format!("{base}/api/instances");
    let fail = |why: String| {
        down(format!(
            "cannot read {url}: {why}\n  check that the proxy is running with its admin listener at {base} \
             (the `[admin]` address of its configuration) and, when it listens beyond loopback, give its token with --admin-token"
        ))
    };
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut request = client.get(&url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| fail(e.to_string()))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(fail(format!("answered {status}: {}", body.trim())));
    }
    let body: Value = response
        .json()
        .await
        .map_err(|e| fail(format!("not JSON: {e}")))?;
    match body.get("instances").and_then(Value::as_array) {
        Some(list) => Ok(list.clone()),
        None => Err(fail("no `instances` array in the answer".into())),
    }
}

fn lease_text(row: &InstanceRow) -> String {
    match row.source {
        "etcd" if row.lease != 0 => format!("{:x}", row.lease),
        "etcd" => "none".into(),
        "manifest" => "static".into(),
        _ => "-".into(),
    }
}

fn list_json(
    prefix: &str,
    revision: i64,
    modules: &BTreeMap<String, ModuleRow>,
    admin: bool,
) -> Value {
    let modules: Vec<Value> = modules
        .iter()
        .map(|(name, m)| {
            let instances: Vec<Value> = m
                .instances
                .iter()
                .map(|(id, i)| {
                    let mut v = json!({
                        "id": id,
                        "addr": i.addr,
                        "weight": i.weight,
                        "draining": i.draining,
                        "source": i.source,
                        "has_lease": i.lease != 0,
                        "lease": (i.lease != 0).then(|| format!("{:x}", i.lease)),
                        "problem": i.problem,
                    });
                    if admin {
                        let p = i.proxy.as_ref();
                        v["health"] = p.map_or(Value::Null, |p| p["health"].clone());
                        v["in_flight"] = p.map_or(Value::Null, |p| p["in_flight"].clone());
                        v["requests"] = p.map_or(Value::Null, |p| p["requests"].clone());
                        v["proxy_draining"] = p.map_or(Value::Null, |p| p["draining"].clone());
                    }
                    v
                })
                .collect();
            json!({
                "name": name,
                "registered": m.registered,
                "prefixes": m.prefixes,
                "hosts": m.hosts,
                "manifest_error": m.manifest_error,
                "instances": instances,
            })
        })
        .collect();
    json!({ "prefix": prefix, "revision": revision, "modules": modules })
}

fn list_text(modules: &BTreeMap<String, ModuleRow>, admin: bool) -> String {
    let mut header = vec![
        "MODULE", "PREFIXES", "INSTANCE", "ADDR", "WEIGHT", "DRAINING", "LEASE",
    ];
    if admin {
        header.extend(["HEALTH", "IN_FLIGHT", "REQUESTS"]);
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for (name, m) in modules {
        let mut prefixes = if m.registered {
            m.prefixes.join(",")
        } else {
            "(no manifest)".to_string()
        };
        if !m.hosts.is_empty() {
            prefixes = format!("{prefixes} (hosts {})", m.hosts.join(","));
        }
        if let Some(e) = &m.manifest_error {
            notes.push(format!("module `{name}`: invalid manifest: {e}"));
        }
        if m.instances.is_empty() {
            let mut row = vec![name.clone(), prefixes.clone()];
            row.extend(["-", "-", "-", "-", "-"].map(String::from));
            if admin {
                row.extend(["-", "-", "-"].map(String::from));
            }
            rows.push(row);
        }
        for (id, i) in &m.instances {
            let mut row = vec![
                name.clone(),
                prefixes.clone(),
                id.clone(),
                i.addr.clone(),
                i.weight.to_string(),
                if i.draining { "yes" } else { "no" }.to_string(),
                lease_text(i),
            ];
            if admin {
                let cell = |field: &str| match i.proxy.as_ref().map(|p| &p[field]) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => "-".to_string(),
                    Some(v) => v.to_string(),
                };
                row.push(if i.proxy.is_some() {
                    cell("health")
                } else {
                    "(not in proxy)".to_string()
                });
                row.push(cell("in_flight"));
                row.push(cell("requests"));
            }
            if let Some(p) = &i.problem {
                notes.push(format!("instance `{id}` of module `{name}`: {p}"));
            }
            rows.push(row);
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (c, cell) in cells.iter().enumerate() {
            if c + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.clone());
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    for n in notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}
