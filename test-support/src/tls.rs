//! [`TestPki`]: a throw-away certificate authority (rcgen) issuing leaf certificates for DNS
//! names (exact or wildcard) and IP addresses, written as PEM files like cert-manager does;
//! HTTPS reqwest clients trusting it; and raw rustls (ring) probes that report what a TLS
//! server presents for a given SNI: certificate names, ALPN, protocol version.
//!
//! Everything uses the ring provider explicitly, never the process-wide default provider.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

/// A test CA. Each `TestPki` has its own key, so certificates from two instances do not
/// verify against each other.
pub struct TestPki {
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
    ca_pem: String,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").finish_non_exhaustive()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// Creates a new CA (ECDSA P-256, CN `SPACE test CA <key id>`).
    pub fn new() -> TestPki {
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A per-CA name, so a certificate from another TestPki fails as UnknownIssuer
        // (as a foreign CA would in production) rather than BadSignature.
        let id: String = ca_key.public_key_raw()[1..7]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("SPACE test CA {id}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = params.self_signed(&ca_key).expect("self-sign CA");
        let ca_pem = ca_cert.pem();
        TestPki {
            ca_cert,
            ca_key,
            ca_pem,
        }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Issues a leaf certificate for `names` (DNS names such as `ehr.example.test` or
    /// `*.example.test`, and IP addresses such as `127.0.0.1`), signed by this CA.
    /// Returns `(cert_pem, key_pem)`; the cert PEM holds the leaf only.
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        self.issue_leaf(names, false)
    }

    /// Like [`TestPki::issue`], but the certificate expired in 2001 (for rejection tests).
    pub fn issue_expired(&self, names: &[&str]) -> (String, String) {
        self.issue_leaf(names, true)
    }

    fn issue_leaf(&self, names: &[&str], expired: bool) -> (String, String) {
        assert!(
            !names.is_empty(),
            "a leaf certificate needs at least one name"
        );
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap_or_else(|e| panic!("bad certificate names {names:?}: {e}"));
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign leaf certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// Issues a certificate for `names` and writes `dir/<stem>.crt` (leaf then CA, PEM) and
    /// `dir/<stem>.key`. Each file is written to a temp name and renamed into place, so a
    /// directory watcher never reads half a file. Returns `(crt_path, key_path)`.
    pub fn write_pair(&self, dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key) = self.issue(names);
        let crt_path = dir.join(format!("{stem}.crt"));
        let key_path = dir.join(format!("{stem}.key"));
        // Key first: a watcher that reacts to the .crt finds its key already in place.
        write_atomically(&key_path, &key);
        write_atomically(&crt_path, &format!("{cert}{}", self.ca_pem));
        (crt_path, key_path)
    }

    /// Writes the CA certificate to `dir/ca.crt` and returns the path.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.crt");
        write_atomically(&path, &self.ca_pem);
        path
    }

    /// A rustls client config (ring) trusting only this CA, offering ALPN `h2`, `http/1.1`.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots_from_pem(&self.ca_pem))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }

    /// A rustls server config (ring) presenting a fresh certificate for `names` (with the
    /// CA in the chain), no client auth, no ALPN (set `alpn_protocols` if needed).
    pub fn server_config(&self, names: &[&str]) -> rustls::ServerConfig {
        let (cert, key) = self.issue(names);
        rustls::ServerConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_no_client_auth()
            .with_single_cert(
                certs_from_pem(&format!("{cert}{}", self.ca_pem)),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("parse key PEM"),
            )
            .expect("build server config")
    }
}

/// All certificates in a PEM text, in order.
pub fn certs_from_pem(pem: &str) -> Vec<CertificateDer<'static>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("bad certificate PEM: {e:?}"));
    assert!(!certs.is_empty(), "no certificate in PEM text");
    certs
}

fn roots_from_pem(pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs_from_pem(pem) {
        roots.add(cert).expect("add CA certificate to root store");
    }
    roots
}

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn write_atomically(path: &Path, contents: &str) {
    let file_name = path
        .file_name()
        .expect("path has a file name")
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    std::fs::write(&tmp, contents).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// A reqwest builder (see [`crate::http::client_builder`]: no redirects, no env proxies)
/// that trusts `ca_pem` and no built-in roots. Add `.resolve("ehr.example.test", addr)` to
/// reach a loopback listener under a certificate name.
pub fn https_client_builder(ca_pem: &str) -> reqwest::ClientBuilder {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("parse CA PEM");
    crate::http::client_builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
}

/// A reqwest client trusting `ca_pem`; see [`https_client_builder`].
pub fn https_client(ca_pem: &str) -> reqwest::Client {
    https_client_builder(ca_pem)
        .build()
        .expect("build HTTPS client")
}

/// What a TLS server presented in one handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPeer {
    /// DNS SANs of the leaf certificate, in certificate order.
    pub dns_names: Vec<String>,
    /// IP SANs of the leaf certificate.
    pub ip_addrs: Vec<IpAddr>,
    /// Number of certificates the server sent (leaf + intermediates/CA).
    pub chain_len: usize,
    /// The ALPN protocol the server chose, if any.
    pub alpn: Option<Vec<u8>>,
    /// The negotiated version, e.g. `TLSv1_3`.
    pub version: String,
}

/// Options for [`probe_tls`]. The default offers no ALPN, TLS 1.2 and 1.3, and accepts any
/// certificate (its handshake signature is still checked).
#[derive(Clone, Debug, Default)]
pub struct ProbeOptions {
    /// ALPN protocols to offer, e.g. `[b"h2".to_vec(), b"http/1.1".to_vec()]`.
    pub alpn: Vec<Vec<u8>>,
    /// Versions to offer (`&rustls::version::TLS12`, `&rustls::version::TLS13`); empty = both.
    pub versions: Vec<&'static rustls::SupportedProtocolVersion>,
    /// If set, verify the server's chain and name against this CA (PEM) and fail otherwise.
    pub ca_pem: Option<String>,
}

/// Does one blocking TLS handshake with `addr`, sending `sni` as server name, and reports
/// what the server presented. An IP address as `sni` sends no SNI extension at all.
///
/// Returns `Err` with the reason (alert, verification error, I/O error) if the handshake
/// fails, so tests can assert rejections. Times out after 10 s.
pub fn probe_tls(addr: SocketAddr, sni: &str, options: &ProbeOptions) -> Result<TlsPeer, String> {
    let provider = ring_provider();
    let versions = if options.versions.is_empty() {
        rustls::DEFAULT_VERSIONS.to_vec()
    } else {
        options.versions.clone()
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("bad versions: {e}"))?;
    let mut config = match &options.ca_pem {
        Some(ca_pem) => builder
            .with_root_certificates(roots_from_pem(ca_pem))
            .with_no_client_auth(),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = options.alpn.clone();
    let server_name =
        ServerName::try_from(sni.to_string()).map_err(|e| format!("bad SNI {sni:?}: {e}"))?;
    let mut conn = ClientConnection::new(Arc::new(config), server_name)
        .map_err(|e| format!("client connection: {e}"))?;
    let timeout = Duration::from_secs(10);
    let mut sock =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    sock.set_read_timeout(Some(timeout))
        .and_then(|()| sock.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| format!("TLS handshake with {addr} (SNI {sni}): {e}"))?;
    }
    let chain = conn
        .peer_certificates()
        .ok_or_else(|| "server sent no certificate".to_string())?;
    let (dns_names, ip_addrs) = leaf_names(&chain[0])?;
    let peer = TlsPeer {
        dns_names,
        ip_addrs,
        chain_len: chain.len(),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        version: conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default(),
    };
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    Ok(peer)
}

/// The DNS SANs of the certificate `addr` presents for `sni` (no verification); panics if
/// the handshake fails.
#[track_caller]
pub fn fetch_peer_cert_names(addr: SocketAddr, sni: &str) -> Vec<String> {
    probe_tls(addr, sni, &ProbeOptions::default())
        .unwrap_or_else(|e| panic!("{e}"))
        .dns_names
}

/// The ALPN protocol `addr` picks for `sni` when offered `h2` and `http/1.1` (no
/// verification); panics if the handshake fails.
#[track_caller]
pub fn negotiated_alpn(addr: SocketAddr, sni: &str) -> Option<Vec<u8>> {
    let options = ProbeOptions {
        alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        ..ProbeOptions::default()
    };
    probe_tls(addr, sni, &options)
        .unwrap_or_else(|e| panic!("{e}"))
        .alpn
}

fn leaf_names(der: &CertificateDer<'_>) -> Result<(Vec<String>, Vec<IpAddr>), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("unparsable leaf certificate: {e}"))?;
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        match name {
            GeneralName::DNSName(n) => dns.push(n.to_string()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*bytes).expect("4 bytes"))),
                16 => ips.push(IpAddr::from(
                    <[u8; 16]>::try_from(*bytes).expect("16 bytes"),
                )),
                _ => return Err(format!("bad IP SAN of {} bytes", bytes.len())),
            },
            _ => {}
        }
    }
    Ok((dns, ips))
}

/// Accepts any server certificate but still checks the handshake signature, so a probe can
/// report whatever the server presents. Use it in a test client's `dangerous()` config.
#[derive(Debug)]
pub struct AcceptAnyCertificate(pub Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
