//! Assembles a running SPACE from a validated [`Config`]: certificates, the route table,
//! the proxy service with its HTTP (and h2c) and HTTPS listeners, the admin listener, the
//! health checker, live reload and the shutdown behaviour.
use std::{
    net::{SocketAddr, TcpListener},
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use anyhow::{bail, Context};
use http::HeaderValue;
use pingora_core::{
    apps::HttpServerOptions,
    listeners::tls::TlsSettings,
    server::{configuration::ServerConf, RunArgs, Server},
    services::{background::background_service, listening::Service, ServiceWithDependents},
};
use space_registry::{Config, Desired, EtcdProvider, InstanceStates, RouteTable, RouteTableHandle};

use crate::{
    admin::AdminApp,
    health::HealthChecker,
    reload::{ReloadStats, Reloader},
    service::{GlobalStats, ProxyState, SpaceProxy},
    shutdown::SpaceSignals,
};

/// Extra services to run in the same process (the demo's sample backends).
pub type ExtraServices = Vec<Box<dyn ServiceWithDependents>>;

/// Names the dev certificate covers.
pub const DEV_CERT_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1", "*.localhost"];

fn check_bindable(what: &str, addr: SocketAddr) -> anyhow::Result<()> {
    TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("cannot listen on {addr} ({what}): is another process using it? Change [listeners].{what} in the configuration"))
}

/// Loads certificates for HTTPS (generating a dev certificate if asked and none exists).
pub fn load_certificates(config: &Config) -> anyhow::Result<Option<space_certs::CertStore>> {
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    space_certs::install_default_crypto_provider();
    if tls.generate_dev_cert {
        let has_pairs = std::fs::read_dir(&tls.cert_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.path().extension().is_some_and(|x| x == "key"))
            })
            .unwrap_or(false);
        if !has_pairs {
            let (cert, _) =
                space_certs::ensure_dev_cert(&tls.cert_dir, "space-dev", DEV_CERT_NAMES)
                    .with_context(|| {
                        format!(
                            "generating a development certificate in {}",
                            tls.cert_dir.display()
                        )
                    })?;
            tracing::warn!(cert = %cert.display(), "generated a self-signed development certificate; browsers will warn. Put real certificates in {} for production", tls.cert_dir.display());
        }
    }
    let store = space_certs::CertStore::load_dir(&tls.cert_dir, tls.default_cert.as_deref())
        .with_context(|| {
            format!(
                "loading certificates from {} ([tls].cert_dir)",
                tls.cert_dir.display()
            )
        })?;
    Ok(Some(store))
}

/// Runs SPACE until SIGTERM/SIGINT. Never returns on success (the process exits 0).
pub fn run(config: Config, extra: ExtraServices) -> anyhow::Result<()> {
    for (what, addr) in [
        ("http", config.listeners.http),
        ("https", config.listeners.https),
        ("admin", config.listeners.admin),
    ] {
        if let Some(addr) = addr {
            check_bindable(what, addr)?;
        }
    }
    let certs = load_certificates(&config)?;
    let _cert_watch = match &certs {
        Some(store) => Some(
            store
                .watch(Duration::from_secs(10))
                .context("watching the certificate directory")?,
        ),
        None => None,
    };

    let states = InstanceStates::new();
    let routes = RouteTableHandle::new(RouteTable::empty("starting"));
    let etcd_prefix = config
        .etcd
        .as_ref()
        .map_or("/space/", |e| e.prefix.as_str());
    let desired = Desired::new(states.clone(), routes.clone(), etcd_prefix);
    let revision = desired
        .set_file(config.clone())
        .map_err(|e| anyhow::anyhow!("route table: {e}"))?;
    let etcd = config.etcd.clone().map(|settings| {
        let provider = EtcdProvider::new(settings, desired.clone());
        provider.load_snapshot();
        provider
    });
    {
        let table = routes.load();
        tracing::info!(revision = %revision, modules = table.modules().len(), instances = table.instance_count(), "route table ready");
    }

    let hsts = config
        .tls
        .as_ref()
        .and_then(|t| t.hsts.as_deref())
        .map(HeaderValue::from_str)
        .transpose()
        .context("[tls].hsts_max_age")?;
    let state = Arc::new(ProxyState {
        desired: desired.clone(),
        etcd: etcd.as_ref().map(|p| p.stats.clone()),
        dns: Default::default(),
        routes: routes.clone(),
        states: states.clone(),
        server: config.server.clone(),
        listeners: config.listeners.clone(),
        hsts,
        in_flight: AtomicU64::new(0),
        shutting_down: Default::default(),
        global: GlobalStats::default(),
    });
    let reload_stats = Arc::new(ReloadStats::default());

    let grace = config.server.grace_period;
    let conf = ServerConf {
        threads: config.server.threads,
        work_stealing: false,
        upstream_keepalive_pool_size: config.server.upstream_keepalive_pool,
        grace_period_seconds: Some(grace.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut options = HttpServerOptions::default();
    options.h2c = config.listeners.h2c;
    // HTTP/1.1 requests take SPACE's own request loop; Pingora's request path serves what
    // that loop hands it (refusals, retries, HTTP/1.0, chunked uploads, upgrades) and HTTP/2.
    let h2c = options.h2c;
    let mut fallback = pingora_proxy::http_proxy(
        &server.configuration,
        SpaceProxy {
            state: state.clone(),
        },
    );
    fallback.server_options = Some(options);
    let mut proxy = Service::new(
        "space proxy".to_string(),
        crate::h1::SpaceApp::new(state.clone(), fallback, h2c),
    );
    if let Some(addr) = config.listeners.http {
        proxy.add_tcp(&addr.to_string());
    }
    if let (Some(addr), Some(store)) = (config.listeners.https, &certs) {
        let mut tls = TlsSettings::intermediate("", "").context("TLS settings")?;
        tls.set_cert_resolver(store.resolver());
        tls.enable_h2();
        proxy.add_tls_with_settings(&addr.to_string(), None, tls);
    }
    server.add_service(proxy);

    if let Some(addr) = config.listeners.admin {
        let mut admin = Service::new(
            "space admin".to_string(),
            AdminApp {
                state: state.clone(),
                reload: reload_stats.clone(),
                certs: certs.clone(),
                token: config.listeners.admin_token.clone(),
                listeners: crate::listening::ProxyListeners::new(
                    config
                        .listeners
                        .http
                        .into_iter()
                        .chain(config.listeners.https.filter(|_| certs.is_some()))
                        .collect(),
                ),
            },
        );
        admin.threads = Some(1);
        admin.add_tcp(&addr.to_string());
        server.add_service(admin);
    }

    if let Some(provider) = &etcd {
        server.add_service(background_service(
            "space etcd discovery",
            EtcdService {
                provider: provider.clone(),
            },
        ));
    }
    server.add_service(background_service(
        "space dns discovery",
        DnsService {
            desired: desired.clone(),
            settings: config.dns.clone(),
            handle: state.dns.clone(),
        },
    ));
    server.add_service(background_service(
        "space health checks",
        HealthChecker {
            routes: routes.clone(),
        },
    ));
    for service in extra {
        server.add_boxed_service(service);
    }

    let reloader = Arc::new(Reloader {
        config_path: config.path.clone(),
        desired: desired.clone(),
        stats: reload_stats,
        started_with: config.clone(),
    });
    reloader.spawn().context("starting configuration reload")?;

    let listening: Vec<String> = [
        config.listeners.http.map(|a| format!("http://{a}")),
        config.listeners.https.map(|a| format!("https://{a}")),
        config.listeners.admin.map(|a| format!("admin http://{a}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    tracing::info!(listeners = %listening.join(", "), threads = config.server.threads, "SPACE is starting");
    if listening.is_empty() {
        bail!("nothing to listen on");
    }
    server.run(RunArgs {
        shutdown_signal: Box::new(SpaceSignals { state, grace }),
    });
    std::process::exit(0);
}

/// Runs the etcd provider on a Pingora background runtime until shutdown.
struct EtcdService {
    provider: Arc<EtcdProvider>,
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for EtcdService {
    async fn start(&self, shutdown: pingora_core::server::ShutdownWatch) {
        self.provider.clone().run(shutdown).await;
    }
}

/// Runs DNS discovery: the modules with `dns`/`srv` get their instances from DNS answers.
struct DnsService {
    desired: Arc<Desired>,
    settings: space_registry::DnsSettings,
    handle: Arc<std::sync::OnceLock<space_registry::DnsDiscovery>>,
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for DnsService {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        let desired = self.desired.clone();
        let on_update: space_registry::DnsUpdateFn = Arc::new(move |module, instances| {
            let count = instances.len();
            match desired.set_dns(module, instances) {
                Ok(rev) => {
                    tracing::info!(module = %module, instances = count, revision = %rev, "DNS answer applied")
                }
                Err(e) => tracing::error!(module = %module, "DNS answer could not be applied: {e}"),
            }
        });
        let dns = match space_registry::DnsDiscovery::spawn(self.settings.clone(), on_update) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("DNS discovery is off: {e}");
                return;
            }
        };
        let for_hook = dns.clone();
        self.desired
            .set_dns_hook(Box::new(move |targets| for_hook.set_targets(targets)));
        let _ = self.handle.set(dns.clone());
        let _ = shutdown.changed().await;
        dns.shutdown();
    }
}
