//! The etcd key layout and the connection to etcd, shared by the provider and the
//! `space module` commands.
//!
//! Under the prefix (default `/space/`): `modules/<module>` holds the module manifest as
//! JSON; `instances/<module>/<instance-id>` holds `{"addr": "10.0.0.5:80", "weight": 1,
//! "draining": false}`, normally under a lease.
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::EtcdSettings;

/// What an etcd key under the prefix means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdKey<'k> {
    Module {
        module: &'k str,
    },
    Instance {
        module: &'k str,
        id: &'k str,
    },
    /// Anything else under the prefix (ignored).
    Other,
}

/// Reads a key (with the prefix already removed).
pub fn parse_key(rest: &str) -> EtcdKey<'_> {
    if let Some(module) = rest.strip_prefix("modules/") {
        if !module.is_empty() && !module.contains('/') {
            return EtcdKey::Module { module };
        }
    } else if let Some(tail) = rest.strip_prefix("instances/") {
        if let Some((module, id)) = tail.split_once('/') {
            if !module.is_empty() && !id.is_empty() && !id.contains('/') {
                return EtcdKey::Instance { module, id };
            }
        }
    }
    EtcdKey::Other
}

pub fn module_key(prefix: &str, module: &str) -> String {
    format!("{prefix}modules/{module}")
}

pub fn instance_key(prefix: &str, module: &str, id: &str) -> String {
    format!("{prefix}instances/{module}/{id}")
}

pub fn modules_prefix(prefix: &str) -> String {
    format!("{prefix}modules/")
}

pub fn instances_prefix(prefix: &str, module: &str) -> String {
    format!("{prefix}instances/{module}/")
}

/// An error talking to etcd, with the endpoints tried.
#[derive(Debug, thiserror::Error)]
#[error("etcd at {endpoints}: {source}")]
pub struct EtcdError {
    pub endpoints: String,
    #[source]
    pub source: etcd_client::Error,
}

/// Connects to etcd with the settings' TLS and credentials.
pub async fn connect(settings: &EtcdSettings) -> Result<Client, EtcdError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(settings.connect_timeout)
        .with_timeout(
            settings
                .connect_timeout
                .max(std::time::Duration::from_secs(5)),
        )
        .with_keep_alive(
            std::time::Duration::from_secs(10),
            std::time::Duration::from_secs(5),
        );
    if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
        options = options.with_user(user.clone(), password.clone());
    }
    if let Some(ca) = &settings.ca_file {
        let mut tls = TlsOptions::new();
        if let Ok(pem) = std::fs::read(ca) {
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) {
            if let (Ok(c), Ok(k)) = (std::fs::read(cert), std::fs::read(key)) {
                tls = tls.identity(Identity::from_pem(c, k));
            }
        }
        options = options.with_tls(tls);
    }
    Client::connect(settings.endpoints.clone(), Some(options))
        .await
        .map_err(|source| EtcdError {
            endpoints: settings.endpoints.join(","),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(
            parse_key("modules/labs"),
            EtcdKey::Module { module: "labs" }
        );
        assert_eq!(
            parse_key("instances/labs/labs-1"),
            EtcdKey::Instance {
                module: "labs",
                id: "labs-1"
            }
        );
        assert_eq!(parse_key("instances/labs"), EtcdKey::Other);
        assert_eq!(parse_key("modules/a/b"), EtcdKey::Other);
        assert_eq!(parse_key("other"), EtcdKey::Other);
    }
}
