//! `space-certs` owns the TLS certificates of SPACE's HTTPS listener: it loads every
//! pair from a directory (flat `<name>.crt` + `<name>.key` files and Kubernetes
//! `<name>/tls.crt` + `tls.key` secret volumes, mixed), chooses one per handshake by SNI
//! for rustls (exact name, then one-label wildcard, then the default), reloads on file
//! change without ever dropping a working certificate, and writes a development
//! certificate for local runs.
//!
//! ```no_run
//! # fn main() -> Result<(), space_certs::CertError> {
//! use std::{path::Path, time::Duration};
//! space_certs::install_default_crypto_provider();
//! let store = space_certs::CertStore::load_dir(Path::new("/etc/space/certs"), None)?;
//! let _watch = store.watch(Duration::from_secs(60))?; // keep alive while serving
//! let resolver = store.resolver(); // -> pingora TlsSettings::set_cert_resolver
//! # let _ = resolver; Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod dev;
mod error;
mod index;
mod load;
mod store;
mod time;
mod watch;

pub use dev::ensure_dev_cert;
pub use error::CertError;
pub use load::Layout;
pub use store::{validate_dir, CertStats, CertStore, CertSummary, Refusal, ReloadReport};
pub use watch::CertWatch;

/// Installs rustls' `ring` provider as the process default, if none is installed yet.
/// Call once at startup, before building any rustls or pingora TLS config: the store
/// itself signs with `ring` regardless, but `ServerConfig::builder()` elsewhere needs a
/// process default when more than one provider is compiled in.
pub fn install_default_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
