//! The development certificate: a self-signed ECDSA P-256 pair for `space demo` and
//! local runs, written as `<dir>/<stem>.crt` + `<dir>/<stem>.key` (key mode 0600),
//! reused while it loads, is valid and covers the requested names, regenerated otherwise.

use std::{
    fs,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose,
};

use crate::{
    load::{load_pair, normalize_name, Layout, LoadedPair, PairSpec},
    time, CertError,
};

/// Days the development certificate is valid (from yesterday, against clock skew).
const VALID_DAYS: i64 = 365;

/// Writes a self-signed development certificate for `names` (e.g. `["localhost",
/// "127.0.0.1", "*.localhost"]`; IP strings become IP SANs) as `<dir>/<file_stem>.crt`
/// and `<dir>/<file_stem>.key` (key mode 0600; `dir` created with mode 0700 if
/// missing), unless both already exist, load, are currently valid and cover `names`.
/// Never reuses a broken pair: regenerates it. Valid for one year. Returns the
/// (certificate, key) paths.
pub fn ensure_dev_cert(
    dir: &Path,
    file_stem: &str,
    names: &[&str],
) -> Result<(PathBuf, PathBuf), CertError> {
    let spec = PairSpec {
        name: file_stem.to_owned(),
        cert: dir.join(format!("{file_stem}.crt")),
        key: dir.join(format!("{file_stem}.key")),
        layout: Layout::Flat,
    };
    if file_stem.is_empty() || file_stem.starts_with('.') || file_stem.contains(['/', '\\']) {
        return Err(CertError::Generate {
            path: spec.cert,
            reason: format!("invalid file stem `{file_stem}`"),
            fix: "use a plain file name such as `dev` (no slash, not starting with a dot)",
        });
    }
    if names.is_empty() {
        return Err(CertError::Generate {
            path: spec.cert,
            reason: "no names given".to_owned(),
            fix: "pass at least one DNS name or IP address, e.g. localhost",
        });
    }

    if spec.cert.exists() && spec.key.exists() {
        match load_pair(&spec) {
            Ok(pair) => match reuse_problem(&pair, names) {
                None => {
                    restrict_key_mode(&spec.key)?;
                    tracing::debug!(cert = %spec.cert.display(), "reusing development certificate");
                    return Ok((spec.cert, spec.key));
                }
                Some(why) => {
                    tracing::info!(cert = %spec.cert.display(), reason = %why, "regenerating development certificate")
                }
            },
            Err(e) => {
                tracing::warn!(cert = %spec.cert.display(), error = %e, "development certificate is broken; regenerating")
            }
        }
    }

    create_private_dir(dir)?;
    let (cert_pem, key_pem) = generate(&spec, names)?;
    write_atomic(&spec.key, key_pem.as_bytes(), 0o600)?;
    write_atomic(&spec.cert, cert_pem.as_bytes(), 0o644)?;
    load_pair(&spec)?;
    tracing::info!(cert = %spec.cert.display(), key = %spec.key.display(), names = ?names, "wrote self-signed development certificate (clients will not trust it; use a real certificate in production)");
    Ok((spec.cert, spec.key))
}

/// Why an existing pair should not be reused, if it should not.
fn reuse_problem(pair: &LoadedPair, names: &[&str]) -> Option<String> {
    if let Some(p) = pair.validity_problem(time::now_unix()) {
        return Some(p.to_string());
    }
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| match n.parse::<IpAddr>() {
            Ok(ip) => !pair.ip_addresses.contains(&ip),
            Err(_) => !pair.dns_names.contains(&normalize_name(n)),
        })
        .collect();
    (!missing.is_empty()).then(|| format!("does not cover {}", missing.join(", ")))
}

fn generate(spec: &PairSpec, names: &[&str]) -> Result<(String, String), CertError> {
    let fail = |reason: String| CertError::Generate {
        path: spec.cert.clone(),
        reason,
        fix: "pass valid DNS names (letters, digits, '-', '.', a leading '*.') or IP addresses",
    };
    let key = KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let owned: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(owned).map_err(|e| fail(e.to_string()))?;
    let mut dn = DistinguishedName::new();
    let cn = names
        .iter()
        .find(|n| n.parse::<IpAddr>().is_err())
        .unwrap_or(&names[0]);
    dn.push(DnType::CommonName, *cn);
    dn.push(DnType::OrganizationName, "SPACE development certificate");
    params.distinguished_name = dn;
    let today = time::now_unix().div_euclid(86_400);
    let (y, m, d) = ymd(today - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = ymd(today + VALID_DAYS);
    params.not_after = rcgen::date_time_ymd(y, m, d);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key).map_err(|e| fail(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Calendar date of a day counted from 1970-01-01, as rcgen takes it.
fn ymd(days: i64) -> (i32, u8, u8) {
    let (y, m, d) = time::civil_from_days(days);
    (y as i32, m as u8, d as u8)
}

fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| CertError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes through a hidden temp file (which the directory scan ignores) and renames
/// it into place, so a watcher never reads half a file.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(err)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)
}

fn restrict_key_mode(key: &Path) -> Result<(), CertError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(key).map_err(|source| CertError::Read {
            path: key.to_path_buf(),
            source,
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(key, fs::Permissions::from_mode(0o600)).map_err(|source| {
                CertError::Write {
                    path: key.to_path_buf(),
                    source,
                }
            })?;
        }
    }
    #[cfg(not(unix))]
    let _ = key;
    Ok(())
}
