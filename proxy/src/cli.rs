//! The `space` command line: `run`, `validate`, `demo`.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "space",
    version,
    about = "SPACE: the edge proxy for a containerized EHR"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SPACE_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve with a configuration file (reloaded on change and on SIGHUP).
    Run {
        #[arg(long, short, env = "SPACE_CONFIG")]
        config: PathBuf,
    },
    /// Check a configuration (and its manifests and certificates) without serving.
    Validate {
        #[arg(long, short, env = "SPACE_CONFIG")]
        config: PathBuf,
    },
    /// Run SPACE in front of built-in sample backends on an embedded configuration.
    Demo {
        /// Where the demo writes its configuration, manifests and dev certificate.
        #[arg(long, default_value = "space-demo")]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8443")]
        https: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
    },
    /// Register a module instance in etcd (and keep it alive), drain, deregister or list them.
    Module(crate::module_cmd::ModuleArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPACE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn")
        });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the command line; the binary's `main` calls this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Validate { config } => validate(&config),
        Command::Run { config } => {
            let result = space_registry::load_config(&absolute(&config))
                .map_err(|e| anyhow::anyhow!("{e}"))
                .and_then(|c| crate::server::run(c, Vec::new()));
            report(result)
        }
        Command::Demo {
            dir,
            http,
            https,
            admin,
        } => {
            let opts = crate::demo::DemoOptions {
                dir,
                http,
                https,
                admin,
            };
            let result = crate::demo::prepare(&opts).and_then(|(path, services, banner)| {
                let config = space_registry::load_config(&absolute(&path))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                eprintln!("{banner}");
                crate::server::run(config, services)
            });
            report(result)
        }
        Command::Module(args) => crate::module_cmd::run(args),
    }
}

/// The configuration path made absolute, so that file-change events (which carry absolute
/// paths) match it and relative paths inside it resolve the same way after a `cd`.
fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("space: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn validate(path: &std::path::Path) -> ExitCode {
    let config = match space_registry::load_config(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut problems = Vec::new();
    if let Some(tls) = &config.tls {
        let empty_dev = tls.generate_dev_cert
            && std::fs::read_dir(&tls.cert_dir).map_or(true, |mut d| d.next().is_none());
        if !empty_dev {
            if !tls.cert_dir.is_dir() {
                problems.push(format!(
                    "{}: tls.cert_dir: {} is not a directory (fix: create it and put NAME.crt + NAME.key pairs in it, or set generate_dev_cert = true for a development certificate)",
                    path.display(),
                    tls.cert_dir.display()
                ));
            } else {
                let found = space_certs::validate_dir(&tls.cert_dir);
                if found.is_empty() {
                    // The directory is fine: check that the default certificate exists in it.
                    space_certs::install_default_crypto_provider();
                    if let Err(e) =
                        space_certs::CertStore::load_dir(&tls.cert_dir, tls.default_cert.as_deref())
                    {
                        problems.push(format!("{}: tls.default_cert: {e}", path.display()));
                    }
                }
                problems.extend(found.iter().map(|e| e.to_string()));
            }
        }
    }
    // Overlapping prefixes and repeated names were refused by load_config already.
    if !problems.is_empty() {
        eprintln!("{} problem(s) in the configuration:", problems.len());
        for p in problems {
            eprintln!("  {p}");
        }
        return ExitCode::FAILURE;
    }
    let instances: usize = config.modules.iter().map(|m| m.instances.len()).sum();
    println!(
        "{}: OK ({} modules, {} static instances, revision {})",
        path.display(),
        config.modules.len(),
        instances,
        config.revision
    );
    ExitCode::SUCCESS
}
