//! Finding and parsing certificate pairs: scanning a directory for flat
//! `<name>.crt|.pem` + `<name>.key` pairs and Kubernetes `<name>/tls.crt` + `tls.key`
//! secrets, reading the PEM files, checking that the key matches the leaf, and
//! extracting what SNI selection and the summary need (SAN names, validity, fingerprint).

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer},
    sign::CertifiedKey,
};
use sha2::{Digest, Sha256};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

use crate::CertError;

/// Which directory layout a pair came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `<dir>/<name>.crt` (or `.pem`) with `<dir>/<name>.key`.
    Flat,
    /// `<dir>/<name>/tls.crt` with `<dir>/<name>/tls.key` (Kubernetes Secret volume).
    Kubernetes,
}

/// Where one pair lives on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PairSpec {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub layout: Layout,
}

/// What a directory scan found: the pairs to load and the problems that stop a
/// name from loading (keyed by pair name so a reload can keep that name's old certificate).
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub pairs: Vec<PairSpec>,
    pub problems: Vec<(String, CertError)>,
}

/// A pair that parsed and whose key matches its leaf.
#[derive(Debug)]
pub(crate) struct LoadedPair {
    pub spec: PairSpec,
    pub key: Arc<CertifiedKey>,
    /// SAN DNS names of the leaf, lowercased (CN if the leaf has none).
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the leaf certificate's DER, lowercase hex.
    pub sha256: String,
    /// SHA-256 over both files' bytes: tells a changed pair from an unchanged one.
    pub content_hash: [u8; 32],
}

impl LoadedPair {
    /// Expiry and not-yet-valid problems at `now` (unix seconds).
    pub fn validity_problem(&self, now: i64) -> Option<CertError> {
        if now > self.not_after {
            Some(CertError::Expired {
                path: self.spec.cert.clone(),
                not_after: crate::time::rfc3339(self.not_after),
            })
        } else if now < self.not_before {
            Some(CertError::NotYetValid {
                path: self.spec.cert.clone(),
                not_before: crate::time::rfc3339(self.not_before),
            })
        } else {
            None
        }
    }
}

const K8S_CERT: &str = "tls.crt";
const K8S_KEY: &str = "tls.key";
/// Stem of the CA bundle a Kubernetes TLS secret carries next to `tls.crt`.
const CA_BUNDLE: &str = "ca";

/// Lists the pairs in `dir`. Entries whose names start with `.` are skipped (the
/// kubelet's `..data` and timestamped folders, editor and temp files), and so is a
/// `ca.crt`/`ca.pem` without `ca.key` (the CA bundle of a secret mounted as `dir`
/// itself, whose `tls.crt` + `tls.key` then load as the pair `tls`).
pub(crate) fn scan_dir(dir: &Path) -> Result<Scan, CertError> {
    let read_dir = |source| CertError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir)? {
        let entry = entry.map_err(read_dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();

    // name -> every file or folder that defines it, in scan order.
    let mut certs: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut keys: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut secrets: BTreeMap<String, PairSpec> = BTreeMap::new();
    let mut scan = Scan::default();

    for name in names {
        let path = dir.join(&name);
        // metadata() follows symlinks; a dangling symlink is treated as a file so
        // that reading it reports the problem.
        let is_dir = fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
        if is_dir {
            let cert = path.join(K8S_CERT);
            let key = path.join(K8S_KEY);
            match (exists(&cert), exists(&key)) {
                (true, true) => {
                    secrets.insert(
                        name.clone(),
                        PairSpec {
                            name,
                            cert,
                            key,
                            layout: Layout::Kubernetes,
                        },
                    );
                }
                (true, false) => scan
                    .problems
                    .push((name, CertError::MissingKey { cert, key })),
                (false, true) => scan
                    .problems
                    .push((name, CertError::MissingCert { key, cert })),
                (false, false) => {
                    tracing::debug!(dir = %path.display(), "ignoring folder without tls.crt/tls.key");
                }
            }
            continue;
        }
        let Some((stem, ext)) = name.rsplit_once('.') else {
            continue;
        };
        if stem.is_empty() {
            continue;
        }
        match ext.to_ascii_lowercase().as_str() {
            "crt" | "pem" => certs.entry(stem.to_owned()).or_default().push(path),
            "key" => {
                keys.insert(stem.to_owned(), path);
            }
            _ => {}
        }
    }

    let mut flat: BTreeMap<String, PairSpec> = BTreeMap::new();
    for (name, mut paths) in certs {
        let key = keys.remove(&name);
        if key.is_none() && name == CA_BUNDLE && paths.len() == 1 {
            // `ca.crt` without `ca.key` is the CA bundle of a Kubernetes TLS secret
            // mounted as the whole directory: not a serving pair.
            tracing::debug!(file = %paths[0].display(), "ignoring CA bundle");
            continue;
        }
        let cert = paths.remove(0);
        if let Some(second) = paths.into_iter().next() {
            scan.problems.push((
                name.clone(),
                CertError::DuplicateName {
                    name,
                    first: cert,
                    second,
                },
            ));
            continue;
        }
        match key {
            Some(key) => {
                flat.insert(
                    name.clone(),
                    PairSpec {
                        name,
                        cert,
                        key,
                        layout: Layout::Flat,
                    },
                );
            }
            None => {
                let key = dir.join(format!("{name}.key"));
                scan.problems
                    .push((name, CertError::MissingKey { cert, key }));
            }
        }
    }
    for (name, key) in keys {
        let cert = dir.join(format!("{name}.crt"));
        scan.problems
            .push((name, CertError::MissingCert { key, cert }));
    }
    for (name, spec) in secrets {
        if let Some(first) = flat.remove(&name) {
            scan.problems.push((
                name.clone(),
                CertError::DuplicateName {
                    name,
                    first: first.cert,
                    second: spec.cert.parent().unwrap_or(dir).to_path_buf(),
                },
            ));
        } else {
            flat.insert(name, spec);
        }
    }
    scan.pairs = flat.into_values().collect();
    scan.problems.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(scan)
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// The raw bytes of one pair.
#[derive(Debug)]
pub(crate) struct PairFiles {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

pub(crate) fn read_pair(spec: &PairSpec) -> Result<PairFiles, CertError> {
    let read = |path: &Path| {
        fs::read(path).map_err(|source| CertError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    Ok(PairFiles {
        cert: read(&spec.cert)?,
        key: read(&spec.key)?,
    })
}

/// Reads and parses one pair from disk.
pub(crate) fn load_pair(spec: &PairSpec) -> Result<LoadedPair, CertError> {
    let files = read_pair(spec)?;
    parse_pair(spec, &files)
}

/// Parses a pair's bytes: the certificate chain (leaf first), the private key
/// (PKCS#8, PKCS#1 or SEC1), and checks that the key matches the leaf.
pub(crate) fn parse_pair(spec: &PairSpec, files: &PairFiles) -> Result<LoadedPair, CertError> {
    let chain = parse_certs(spec, &files.cert)?;
    let key_der = parse_key(spec, &files.key)?;

    // Validate every certificate's DER and read the leaf.
    for (index, der) in chain.iter().enumerate() {
        parse_x509(spec, index, der)?;
    }
    let leaf = parse_x509(spec, 0, &chain[0])?;
    let (dns_names, ip_addresses) = leaf_names(&leaf);
    let validity = leaf.validity();
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();

    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| {
        CertError::UnsupportedKey {
            path: spec.key.clone(),
            reason: e.to_string(),
        }
    })?;
    let certified = CertifiedKey::new(chain, signing_key);
    check_keys_match(spec, &certified)?;

    let sha256 = hex::encode(Sha256::digest(certified.cert[0].as_ref()));
    Ok(LoadedPair {
        spec: spec.clone(),
        key: Arc::new(certified),
        dns_names,
        ip_addresses,
        not_before,
        not_after,
        sha256,
        content_hash: content_hash(files),
    })
}

pub(crate) fn content_hash(files: &PairFiles) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update((files.cert.len() as u64).to_le_bytes());
    hasher.update(&files.cert);
    hasher.update(&files.key);
    hasher.finalize().into()
}

fn parse_certs(spec: &PairSpec, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let mut chain = Vec::new();
    let mut saw_key = false;
    for item in rustls_pemfile::read_all(&mut &pem[..]) {
        match item {
            Ok(rustls_pemfile::Item::X509Certificate(der)) => chain.push(der),
            Ok(
                rustls_pemfile::Item::Pkcs1Key(_)
                | rustls_pemfile::Item::Pkcs8Key(_)
                | rustls_pemfile::Item::Sec1Key(_),
            ) => saw_key = true,
            Ok(_) => {}
            Err(e) => {
                return Err(CertError::Pem {
                    path: spec.cert.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }
    if chain.is_empty() {
        return Err(if saw_key {
            CertError::KeyInCertFile {
                path: spec.cert.clone(),
                key: spec.key.clone(),
            }
        } else {
            CertError::NoCertificate {
                path: spec.cert.clone(),
            }
        });
    }
    Ok(chain)
}

fn parse_key(spec: &PairSpec, pem: &[u8]) -> Result<PrivateKeyDer<'static>, CertError> {
    for item in rustls_pemfile::read_all(&mut &pem[..]) {
        match item {
            Ok(rustls_pemfile::Item::Pkcs8Key(k)) => return Ok(k.into()),
            Ok(rustls_pemfile::Item::Pkcs1Key(k)) => return Ok(k.into()),
            Ok(rustls_pemfile::Item::Sec1Key(k)) => return Ok(k.into()),
            Ok(_) => {}
            Err(e) => {
                return Err(CertError::Pem {
                    path: spec.key.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }
    if contains(
        pem,
        concat!("-----BEGIN ENCRYPTED ", "PRIVATE KEY-----").as_bytes(),
    ) || contains(pem, b"Proc-Type: 4,ENCRYPTED")
    {
        return Err(CertError::EncryptedKey {
            path: spec.key.clone(),
        });
    }
    Err(CertError::NoPrivateKey {
        path: spec.key.clone(),
        cert: spec.cert.clone(),
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn parse_x509<'a>(
    spec: &PairSpec,
    index: usize,
    der: &'a CertificateDer<'_>,
) -> Result<X509Certificate<'a>, CertError> {
    x509_parser::parse_x509_certificate(der.as_ref())
        .map(|(_, cert)| cert)
        .map_err(|e| CertError::BadCertificate {
            path: spec.cert.clone(),
            index,
            reason: e.to_string(),
        })
}

fn check_keys_match(spec: &PairSpec, certified: &CertifiedKey) -> Result<(), CertError> {
    use rustls::{Error, InconsistentKeys};
    match certified.keys_match() {
        Ok(()) => Ok(()),
        // The key cannot tell its public half: nothing to compare (not the case for
        // the ring keys we load, kept so a future provider does not refuse every pair).
        Err(Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(()),
        Err(Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            // A key that matches a later certificate means the chain is out of order.
            for index in 1..certified.cert.len() {
                let mut reordered = certified.cert.clone();
                reordered.swap(0, index);
                let probe = CertifiedKey::new(reordered, certified.key.clone());
                if probe.keys_match().is_ok() {
                    return Err(CertError::ChainOrder {
                        cert: spec.cert.clone(),
                        key: spec.key.clone(),
                        index,
                    });
                }
            }
            Err(CertError::KeyMismatch {
                key: spec.key.clone(),
                cert: spec.cert.clone(),
            })
        }
        Err(e) => Err(CertError::BadCertificate {
            path: spec.cert.clone(),
            index: 0,
            reason: e.to_string(),
        }),
    }
}

/// Lowercased SAN DNS names (CN when there are none) and SAN IP addresses.
fn leaf_names(leaf: &X509Certificate<'_>) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => dns.push(normalize_name(n)),
                GeneralName::IPAddress(bytes) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                        ips.push(IpAddr::from(v4));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                        ips.push(IpAddr::from(v6));
                    }
                }
                _ => {}
            }
        }
    }
    if dns.is_empty() {
        dns.extend(
            leaf.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .filter(|cn| !cn.is_empty() && !cn.contains(char::is_whitespace))
                .filter(|cn| cn.parse::<IpAddr>().is_err())
                .map(normalize_name),
        );
    }
    dns.dedup();
    (dns, ips)
}

/// Lowercase, without a trailing dot: how names are stored and compared.
pub(crate) fn normalize_name(name: &str) -> String {
    crate::index::normalize(name).into_owned()
}

/// Reads every file of a scan and hashes what was found, so a watcher can tell
/// whether anything changed since the last reload without parsing.
pub(crate) struct DirState {
    pub scan: Result<Scan, CertError>,
    pub files: Vec<Result<PairFiles, CertError>>,
    pub fingerprint: [u8; 32],
}

pub(crate) fn read_dir_state(dir: &Path) -> DirState {
    let scan = scan_dir(dir);
    let mut hasher = Sha256::new();
    let mut files = Vec::new();
    match &scan {
        Ok(scan) => {
            for spec in &scan.pairs {
                hasher.update(format!("pair {spec:?}\n"));
                let read = read_pair(spec);
                match &read {
                    Ok(f) => hasher.update(content_hash(f)),
                    Err(e) => hasher.update(format!("error {e}\n")),
                }
                files.push(read);
            }
            for (name, problem) in &scan.problems {
                hasher.update(format!("problem {name} {problem}\n"));
            }
        }
        Err(e) => hasher.update(format!("scan error {e}\n")),
    }
    DirState {
        scan,
        files,
        fingerprint: hasher.finalize().into(),
    }
}
