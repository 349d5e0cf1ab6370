//! Errors of the certificate store. Every variant names the file (or directory),
//! says what is wrong and how to fix it, so an operator can act on the log line alone.

use std::{
    io,
    path::{Path, PathBuf},
};

/// A problem with a certificate directory, a certificate pair or the watcher.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The certificate directory itself cannot be listed.
    #[error("{}: cannot read certificate directory: {source}; fix: create it, or point the TLS certificate directory at an existing folder the proxy user may read", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The directory holds no certificate pair at all.
    #[error("{}: no certificate pair found; fix: add <name>.crt (or <name>.pem) with <name>.key, or a Kubernetes TLS secret mounted as <name>/tls.crt with <name>/tls.key", dir.display())]
    NoPairs { dir: PathBuf },

    /// A certificate or key file cannot be read.
    #[error("{}: cannot read file: {source}; fix: check that it exists (a dangling symlink counts as missing) and that the proxy user may read it", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The file is not well-formed PEM.
    #[error("{}: malformed PEM: {reason}; fix: re-export the file in PEM format (base64 between -----BEGIN ...----- and -----END ...----- lines)", path.display())]
    Pem { path: PathBuf, reason: String },

    /// The certificate file holds no certificate.
    #[error("{}: no certificate found in PEM (expected -----BEGIN CERTIFICATE-----); fix: put the leaf certificate first, then its chain", path.display())]
    NoCertificate { path: PathBuf },

    /// The certificate file holds a private key but no certificate (files swapped?).
    #[error("{}: holds a private key but no certificate; fix: move the key to {}, and put the leaf certificate first, then its chain, here", path.display(), key.display())]
    KeyInCertFile { path: PathBuf, key: PathBuf },

    /// A certificate in the file is not valid X.509.
    #[error("{}: certificate #{index} in the file is not valid X.509: {reason}; fix: re-export the certificate chain in PEM, leaf first", path.display())]
    BadCertificate {
        path: PathBuf,
        /// Position in the file, 0 = leaf.
        index: usize,
        reason: String,
    },

    /// The key file holds no (unencrypted) private key.
    #[error("{}: no private key found in PEM (expected a PEM block labelled PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY); fix: put the unencrypted private key of {} here", path.display(), cert.display())]
    NoPrivateKey { path: PathBuf, cert: PathBuf },

    /// The key file holds an encrypted private key, which the proxy cannot use.
    #[error("{}: the private key is encrypted; fix: store it unencrypted with restrictive permissions (e.g. `openssl pkey -in {} -out {}.plain`, then replace the file)", path.display(), path.display(), path.display())]
    EncryptedKey { path: PathBuf },

    /// The private key is of a type rustls cannot sign with.
    #[error("{}: unsupported private key: {reason}; fix: use an RSA (2048 bits or more), ECDSA P-256/P-384 or Ed25519 key in PKCS#8, PKCS#1 or SEC1 PEM", path.display())]
    UnsupportedKey { path: PathBuf, reason: String },

    /// The private key does not belong to the leaf certificate.
    #[error("{}: private key does not match certificate {}; fix: install the key issued with this certificate (both files from the same issuance or renewal)", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },

    /// The key matches a certificate further down the file: the chain is out of order.
    #[error("{}: certificates are out of order: the private key {} matches certificate #{index}, not the first; fix: put the leaf certificate first, then its chain", cert.display(), key.display())]
    ChainOrder {
        cert: PathBuf,
        key: PathBuf,
        /// Position in the file of the certificate the key matches.
        index: usize,
    },

    /// A certificate file without its key file.
    #[error("{} has no matching key file {}; fix: add the key file, or remove the certificate", cert.display(), key.display())]
    MissingKey { cert: PathBuf, key: PathBuf },

    /// A key file without its certificate file.
    #[error("{} has no matching certificate file {}; fix: add the certificate (leaf first, then chain), or remove the key", key.display(), cert.display())]
    MissingCert { key: PathBuf, cert: PathBuf },

    /// Two sources in the directory claim the same pair name.
    #[error("{}: pair name `{name}` is also defined by {}; fix: remove or rename one of them", second.display(), first.display())]
    DuplicateName {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },

    /// The leaf certificate has expired (it is still loaded, but clients will reject it).
    #[error("{}: certificate expired at {not_after}; fix: renew it (clients reject expired certificates)", path.display())]
    Expired { path: PathBuf, not_after: String },

    /// The leaf certificate is not valid yet.
    #[error("{}: certificate is not valid before {not_before}; fix: check the system clock, or wait", path.display())]
    NotYetValid { path: PathBuf, not_before: String },

    /// The configured default certificate is not in the directory.
    #[error("{}: default certificate `{name}` not found (pairs: {available}); fix: set the default to one of these names, or add {name}.crt and {name}.key", dir.display())]
    DefaultNotFound {
        dir: PathBuf,
        name: String,
        available: String,
    },

    /// Startup found one or more bad pairs; every problem is listed.
    #[error("{}: {} problem(s) with TLS certificates:{}", dir.display(), problems.len(), list(problems))]
    Invalid {
        dir: PathBuf,
        problems: Vec<CertError>,
    },

    /// The watcher could not be started.
    #[error("{}: cannot watch certificate directory: {reason}; fix: {fix}", dir.display())]
    Watch {
        dir: PathBuf,
        reason: String,
        fix: &'static str,
    },

    /// The development certificate could not be generated.
    #[error("{}: cannot generate development certificate: {reason}; fix: {fix}", path.display())]
    Generate {
        path: PathBuf,
        reason: String,
        fix: &'static str,
    },

    /// A file could not be written.
    #[error("{}: cannot write: {source}; fix: check that the directory exists and the proxy user may write to it", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn list(problems: &[CertError]) -> String {
    problems.iter().map(|p| format!("\n  - {p}")).collect()
}

impl CertError {
    /// The file or directory this problem is about (for `Invalid`, the directory).
    pub fn path(&self) -> &Path {
        match self {
            CertError::ReadDir { dir, .. }
            | CertError::NoPairs { dir }
            | CertError::DefaultNotFound { dir, .. }
            | CertError::Invalid { dir, .. }
            | CertError::Watch { dir, .. } => dir,
            CertError::Read { path, .. }
            | CertError::Pem { path, .. }
            | CertError::NoCertificate { path }
            | CertError::KeyInCertFile { path, .. }
            | CertError::BadCertificate { path, .. }
            | CertError::NoPrivateKey { path, .. }
            | CertError::EncryptedKey { path }
            | CertError::UnsupportedKey { path, .. }
            | CertError::Expired { path, .. }
            | CertError::NotYetValid { path, .. }
            | CertError::Generate { path, .. }
            | CertError::Write { path, .. } => path,
            CertError::KeyMismatch { key, .. } | CertError::MissingCert { key, .. } => key,
            CertError::ChainOrder { cert, .. } | CertError::MissingKey { cert, .. } => cert,
            CertError::DuplicateName { second, .. } => second,
        }
    }

    /// The individual problems: the list inside `Invalid`, or this error alone.
    pub fn problems(&self) -> Vec<&CertError> {
        match self {
            CertError::Invalid { problems, .. } => problems.iter().collect(),
            other => vec![other],
        }
    }
}
