//! The manifests shipped with SPACE: the LibreEHR core, the patient portal and an example
//! module. They are embedded so `space demo` and tools work without the source tree.

/// A manifest shipped with SPACE.
#[derive(Debug, Clone, Copy)]
pub struct BundledManifest {
    /// File name under `modules/manifests/`.
    pub file: &'static str,
    pub text: &'static str,
}

/// Every bundled manifest.
pub const BUNDLED: &[BundledManifest] = &[
    BundledManifest {
        file: "librehealth-core.toml",
        text: include_str!("../manifests/librehealth-core.toml"),
    },
    BundledManifest {
        file: "patient-portal.toml",
        text: include_str!("../manifests/patient-portal.toml"),
    },
    BundledManifest {
        file: "example-module.toml",
        text: include_str!("../manifests/example-module.toml"),
    },
];

/// The bundled manifest with this file name.
pub fn bundled(file: &str) -> Option<&'static BundledManifest> {
    BUNDLED.iter().find(|m| m.file == file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_toml_manifest;

    #[test]
    fn bundled_manifests_validate() {
        for m in BUNDLED {
            parse_toml_manifest(m.text, m.file).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn core_denies_what_htaccess_protects() {
        let core =
            parse_toml_manifest(bundled("librehealth-core.toml").unwrap().text, "core").unwrap();
        for p in [
            "/sites/default/documents/1/x.pdf",
            "/sites/default/edi/x",
            "/sites/default/era/x",
            "/sites/default/logs/x",
            "/sql/database.sql",
            "/Tests/x.php",
            "/Documentation/README",
            "/library/x.inc",
            "/x/y.sql",
            "/setup.php",
        ] {
            assert!(core.deny.is_denied(p), "{p} should be denied");
        }
        assert!(!core.deny.is_denied("/interface/login/login.php"));
    }
}
