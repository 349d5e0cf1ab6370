//! The module manifest: what a module author writes to have a container routed by SPACE.
//!
//! A manifest has one schema wherever it lives: a `[[module]]` table inside `space.toml`,
//! a standalone TOML file in the manifests directory, or JSON under an etcd key. This crate
//! owns that schema ([`RawManifest`], serde), its validation into a typed [`ModuleSpec`]
//! (no serde), and the manifests bundled for the LibreEHR core, the patient portal and an
//! example module. It knows nothing of Pingora or etcd, so module tooling can use it alone.
#![forbid(unsafe_code)]

mod bundled;
mod deny;
mod error;
mod raw;
mod spec;
mod units;
mod validate;

pub use bundled::{bundled, BundledManifest, BUNDLED};
pub use deny::{DenyRules, DenyRulesError};
pub use error::{Issue, ManifestError};
pub use raw::{RawAffinity, RawHealthCheck, RawInstance, RawManifest, RawTimeouts, SizeValue};
pub use spec::{
    AffinitySpec, DnsQuery, HashOn, HealthCheckSpec, HostPattern, InstanceId, InstanceSpec,
    LoadBalancing, ModuleName, ModuleSpec, PathPrefix, SameSite, StatusRanges, Timeouts,
    DEFAULT_DRAIN_TIMEOUT,
};
pub use units::{parse_duration, parse_size};
pub use validate::{
    parse_json_manifest, parse_toml_manifest, toml_issue, validate_instance, validate_manifest,
};
