//! Test helpers: a throwaway CA issuing certificates with rcgen at test time (no key
//! is ever committed), pair writers for both directory layouts, and a real rustls
//! handshake over in-memory buffers that reports which certificate the server sent.

#![allow(dead_code)]

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::{
    crypto::{ring, CryptoProvider},
    pki_types::{CertificateDer, ServerName},
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
};
use space_certs::CertStore;
use test_support::tls::AcceptAnyCertificate;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// A test certificate authority.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf issued by [`Ca`]: PEM chain (leaf, then CA), PEM key, and the leaf DER.
#[derive(Clone)]
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
    pub leaf: CertificateDer<'static>,
}

impl Ca {
    pub fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "SPACE test CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    pub fn issue(&self, names: &[&str]) -> Issued {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        self.issue_with(params)
    }

    pub fn issue_with(&self, mut params: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        if params.distinguished_name.iter().next().is_none() {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "space test leaf");
            params.distinguished_name = dn;
        }
        let leaf = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            chain_pem: format!("{}{}", leaf.pem(), self.cert.pem()),
            key_pem: key.serialize_pem(),
            leaf: leaf.der().clone(),
        }
    }
}

/// Writes `<dir>/<stem>.crt` and `<dir>/<stem>.key`.
pub fn write_flat(dir: &Path, stem: &str, issued: &Issued) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    fs::write(&cert, &issued.chain_pem).unwrap();
    fs::write(&key, &issued.key_pem).unwrap();
    (cert, key)
}

/// A Kubernetes Secret volume as the kubelet writes it:
/// `<dir>/<name>/..<version>/tls.{crt,key}`, `..data -> ..<version>`,
/// `tls.crt -> ..data/tls.crt`, `tls.key -> ..data/tls.key`.
pub fn write_secret(dir: &Path, name: &str, version: &str, issued: &Issued) -> PathBuf {
    let secret = dir.join(name);
    let data = secret.join(format!("..{version}"));
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("tls.crt"), &issued.chain_pem).unwrap();
    fs::write(data.join("tls.key"), &issued.key_pem).unwrap();
    std::os::unix::fs::symlink(format!("..{version}"), secret.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", secret.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", secret.join("tls.key")).unwrap();
    secret
}

/// The kubelet's atomic update: write a new version folder, point `..data_tmp` at
/// it, rename `..data_tmp` over `..data`, delete the old version.
pub fn swap_secret(secret: &Path, old_version: &str, new_version: &str, issued: &Issued) {
    let data = secret.join(format!("..{new_version}"));
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("tls.crt"), &issued.chain_pem).unwrap();
    fs::write(data.join("tls.key"), &issued.key_pem).unwrap();
    std::os::unix::fs::symlink(format!("..{new_version}"), secret.join("..data_tmp")).unwrap();
    fs::rename(secret.join("..data_tmp"), secret.join("..data")).unwrap();
    fs::remove_dir_all(secret.join(format!("..{old_version}"))).unwrap();
}

pub fn server_config(store: &CertStore) -> Arc<ServerConfig> {
    Arc::new(
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(store.resolver()),
    )
}

/// A client that verifies the server against `ca` (real webpki name checks).
pub fn verifying_client(ca: &Ca) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A client that accepts any certificate (still checks the handshake signature),
/// to see what the server sends for names no certificate covers.
pub fn accept_any_client() -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
            .with_no_client_auth(),
    )
}

/// Runs a full TLS handshake in memory and returns the end-entity certificate the
/// client received.
pub fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<CertificateDer<'static>, rustls::Error> {
    let mut client = ClientConnection::new(client, name)?;
    let mut server = ServerConnection::new(server)?;
    for _ in 0..20 {
        while client.wants_write() {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).unwrap();
            }
            server.process_new_packets()?;
        }
        while server.wants_write() {
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
            }
            client.process_new_packets()?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            let certs = client
                .peer_certificates()
                .expect("server sent certificates");
            return Ok(certs[0].clone().into_owned());
        }
    }
    panic!("handshake did not finish");
}

/// The certificate the store serves for `sni` (`None` = the client sends no SNI).
pub fn served(
    store: &CertStore,
    sni: Option<&str>,
) -> Result<CertificateDer<'static>, rustls::Error> {
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_owned()).unwrap(),
        // rustls sends no SNI when connecting to an IP address.
        None => ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into()),
    };
    handshake(server_config(store), accept_any_client(), name)
}

/// Polls `cond` every 50 ms for up to `limit`.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
