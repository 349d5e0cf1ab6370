//! The manifest as written (serde): strings for durations, sizes and addresses, so that
//! validation can say which field is wrong instead of failing inside the parser.
use serde::{Deserialize, Serialize};

/// A size written as a number of bytes or as text such as `"32MiB"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    /// The size in bytes: a number as it is, text such as `32MiB` parsed.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(t) => crate::units::parse_size(t),
        }
    }
}

/// One module manifest as written in TOML or JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    /// Module name: lowercase letters, digits, `-` and `_`.
    #[serde(default)]
    pub name: String,
    /// Path prefixes routed to this module (segment boundaries: `/a` matches `/a/x`, not `/ab`).
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// Host names this module answers for (`ehr.example.org`, `*.example.org`); empty = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Remove the matched prefix before forwarding (off by default: LibreEHR emits root links).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strip_prefix: bool,
    /// `round_robin` (default), `least_connections` or `consistent_hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancing: Option<String>,
    /// Key for `consistent_hash`: `client_ip` (default), `header:NAME` or `cookie:NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<String>,
    /// Names of the backend's session cookies (e.g. `LibreHealthEHR`, `PHPSESSID`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub session_cookies: Vec<String>,
    /// Glob patterns answered with 404 at the edge (`*` within a segment, `**` across).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Largest request body accepted (default `32MiB`); larger gets 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_size: Option<SizeValue>,
    /// How many other instances to try after a connect failure (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub health_check: RawHealthCheck,
    /// Session affinity: SPACE's own routing cookie keeps a session on its instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<RawAffinity>,
    /// Instances from DNS A/AAAA records: `NAME:PORT`, e.g. `portal.ehr.svc.cluster.local:80`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// Instances from DNS SRV records, e.g. `_http._tcp.portal.ehr.svc.cluster.local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srv: Option<String>,
    /// Static instances (discovery providers add more).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<RawInstance>,
}

/// Upstream timeouts, as durations (`"5s"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<String>,
}

/// Active and passive health checking.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_fails: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_timeout: Option<String>,
}

/// One instance (container) of a module.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInstance {
    /// Stable id (defaults to the address). Affinity cookies are keyed on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `IP:PORT`.
    #[serde(default)]
    pub addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// Session affinity settings of a module.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAffinity {
    /// On unless `false` once the table is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Routing cookie name (default `space-<module>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// Routing cookie lifetime; absent = a browser-session cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
    /// How long a draining instance keeps its pinned sessions (default `1h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,
    /// Over HTTPS, add `Secure` to the backend's session cookies (`session_cookies`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_session_cookies: Option<bool>,
    /// Over HTTPS, add this `SameSite` value to the backend's session cookies lacking one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_cookie_samesite: Option<String>,
}
