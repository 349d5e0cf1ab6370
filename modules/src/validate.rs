//! Turns a [`RawManifest`] into a [`ModuleSpec`], collecting every problem before failing.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use crate::{
    spec::{AffinitySpec, DnsQuery, SameSite, DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_BODY},
    units, DenyRules, HashOn, HealthCheckSpec, HostPattern, InstanceId, InstanceSpec, Issue,
    LoadBalancing, ManifestError, ModuleName, ModuleSpec, PathPrefix, RawInstance, RawManifest,
    StatusRanges, Timeouts,
};

/// Parses and validates a TOML manifest (a standalone manifest file).
pub fn parse_toml_manifest(text: &str, source_name: &str) -> Result<ModuleSpec, ManifestError> {
    let raw: RawManifest = toml::from_str(text).map_err(|e| ManifestError {
        source_name: source_name.to_string(),
        issues: vec![toml_issue(text, &e)],
    })?;
    validate_manifest(&raw).map_err(|issues| ManifestError {
        source_name: source_name.to_string(),
        issues,
    })
}

/// Parses and validates a JSON manifest (the form stored in etcd).
pub fn parse_json_manifest(text: &str, source_name: &str) -> Result<ModuleSpec, ManifestError> {
    let raw: RawManifest = serde_json::from_str(text).map_err(|e| ManifestError {
        source_name: source_name.to_string(),
        issues: vec![Issue::new(
            format!("line {} column {}", e.line(), e.column()),
            e.to_string(),
            "write the manifest as a JSON object with the fields of docs/configuration.md",
        )],
    })?;
    validate_manifest(&raw).map_err(|issues| ManifestError {
        source_name: source_name.to_string(),
        issues,
    })
}

/// Describes a TOML parse error with its line and column (shared with `space.toml` parsing).
pub fn toml_issue(text: &str, e: &toml::de::Error) -> Issue {
    let at = e
        .span()
        .map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line} column {col}")
        })
        .unwrap_or_default();
    let message = e.message().trim().to_string();
    let fix = if message.contains("unknown field") {
        "remove or correct the key; the accepted keys are listed in the message and in docs/configuration.md"
    } else {
        "correct the TOML syntax at that position"
    };
    Issue::new(at, message, fix)
}

/// Validates a manifest; on failure returns every issue found, fields relative to the manifest.
pub fn validate_manifest(raw: &RawManifest) -> Result<ModuleSpec, Vec<Issue>> {
    let mut issues = Vec::new();

    let name = validate_name(&raw.name, &mut issues);
    let prefixes = validate_prefixes(&raw.prefixes, &mut issues);
    let hosts = validate_hosts(&raw.hosts, &mut issues);
    let load_balancing = validate_lb(raw, &mut issues);

    let mut session_cookies = Vec::new();
    for (i, c) in raw.session_cookies.iter().enumerate() {
        if c.is_empty() || !c.bytes().all(is_cookie_name_byte) {
            issues.push(Issue::new(
                format!("session_cookies[{i}]"),
                format!("`{c}` is not a valid cookie name"),
                "use the exact cookie name the backend sets, e.g. `PHPSESSID`",
            ));
        } else {
            session_cookies.push(c.clone());
        }
    }

    let deny = match DenyRules::new(&raw.deny) {
        Ok(d) => d,
        Err(errs) => {
            for e in errs {
                issues.push(Issue::new(
                    format!("deny[{}]", e.index),
                    format!("`{}` does not parse: {}", e.pattern, e.reason),
                    "write a glob such as `/sites/*/documents/**` or `**/*.sql` (`*` within a segment, `**` across)",
                ));
            }
            DenyRules::default()
        }
    };

    let max_body_size = match &raw.max_body_size {
        None => DEFAULT_MAX_BODY,
        Some(size) => size.bytes().unwrap_or_else(|e| {
            issues.push(Issue::new(
                "max_body_size",
                e,
                "write a size such as `32MiB`, `350MB` or a number of bytes",
            ));
            DEFAULT_MAX_BODY
        }),
    };
    if max_body_size == 0 {
        issues.push(Issue::new(
            "max_body_size",
            "0 would refuse every request body",
            "write a size such as `32MiB`",
        ));
    }

    let retries = raw.retries.unwrap_or(2);
    if retries > 10 {
        issues.push(Issue::new(
            "retries",
            format!("{retries} retries would multiply load on a failing module"),
            "use a value from 0 to 10",
        ));
    }

    let defaults = Timeouts::default();
    let t = &raw.timeouts;
    let timeouts = Timeouts {
        connect: duration_field(
            "timeouts.connect",
            &t.connect,
            defaults.connect,
            &mut issues,
        ),
        read: duration_field("timeouts.read", &t.read, defaults.read, &mut issues),
        write: duration_field("timeouts.write", &t.write, defaults.write, &mut issues),
        idle: duration_field("timeouts.idle", &t.idle, defaults.idle, &mut issues),
    };

    let health_check = validate_health(raw, &mut issues);
    let affinity = validate_affinity(raw, &mut issues);
    let dns = validate_dns(raw, &mut issues);
    let instances = validate_instances(&raw.instances, &mut issues);

    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(ModuleSpec {
        name,
        prefixes,
        hosts,
        strip_prefix: raw.strip_prefix,
        load_balancing,
        session_cookies,
        deny,
        max_body_size,
        retries,
        timeouts,
        health_check,
        affinity,
        dns,
        instances,
    })
}

fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn validate_dns(raw: &RawManifest, issues: &mut Vec<Issue>) -> Option<DnsQuery> {
    match (&raw.dns, &raw.srv) {
        (Some(_), Some(_)) => {
            issues.push(Issue::new(
                "srv",
                "`dns` and `srv` are both set",
                "use `dns = \"NAME:PORT\"` for A/AAAA records or `srv = \"_http._tcp.NAME\"`, not both",
            ));
            None
        }
        (Some(d), None) => {
            let parsed = d
                .rsplit_once(':')
                .and_then(|(n, p)| Some((n, p.parse::<u16>().ok().filter(|&p| p != 0)?)))
                .filter(|(n, _)| is_dns_name(n));
            match parsed {
                Some((name, port)) => Some(DnsQuery::Address {
                    name: name.to_ascii_lowercase(),
                    port,
                }),
                None => {
                    issues.push(Issue::new(
                        "dns",
                        format!("`{d}` is not NAME:PORT"),
                        "write e.g. `portal.ehr.svc.cluster.local:80`",
                    ));
                    None
                }
            }
        }
        (None, Some(s)) => {
            if is_dns_name(s) {
                Some(DnsQuery::Srv {
                    name: s.to_ascii_lowercase(),
                })
            } else {
                issues.push(Issue::new(
                    "srv",
                    format!("`{s}` is not a DNS name"),
                    "write e.g. `_http._tcp.portal.ehr.svc.cluster.local`",
                ));
                None
            }
        }
        (None, None) => None,
    }
}

fn validate_affinity(raw: &RawManifest, issues: &mut Vec<Issue>) -> Option<AffinitySpec> {
    let a = raw.affinity.as_ref()?;
    if a.enabled == Some(false) {
        return None;
    }
    let cookie = a
        .cookie
        .clone()
        .unwrap_or_else(|| format!("space-{}", raw.name));
    if cookie.is_empty() || !cookie.bytes().all(is_cookie_name_byte) {
        issues.push(Issue::new(
            "affinity.cookie",
            format!("`{cookie}` is not a valid cookie name"),
            "use letters, digits, `-` or `_`, e.g. `space-core`",
        ));
    }
    if raw.session_cookies.contains(&cookie) {
        issues.push(Issue::new(
            "affinity.cookie",
            format!("`{cookie}` is also one of the backend's session_cookies"),
            "give SPACE's routing cookie its own name",
        ));
    }
    let max_age = a.max_age.as_ref().map(|_| {
        duration_field(
            "affinity.max_age",
            &a.max_age,
            DEFAULT_DRAIN_TIMEOUT,
            issues,
        )
    });
    let drain_timeout = duration_field(
        "affinity.drain_timeout",
        &a.drain_timeout,
        DEFAULT_DRAIN_TIMEOUT,
        issues,
    );
    let session_cookie_samesite = match a.session_cookie_samesite.as_deref() {
        None => None,
        Some(v) if v.eq_ignore_ascii_case("lax") => Some(SameSite::Lax),
        Some(v) if v.eq_ignore_ascii_case("strict") => Some(SameSite::Strict),
        Some(v) if v.eq_ignore_ascii_case("none") => Some(SameSite::None),
        Some(v) => {
            issues.push(Issue::new(
                "affinity.session_cookie_samesite",
                format!("`{v}` is not a SameSite value"),
                "use `Lax`, `Strict` or `None`",
            ));
            None
        }
    };
    Some(AffinitySpec {
        cookie,
        max_age,
        drain_timeout,
        secure_session_cookies: a.secure_session_cookies.unwrap_or(false),
        session_cookie_samesite,
    })
}

fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn validate_name(name: &str, issues: &mut Vec<Issue>) -> ModuleName {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        issues.push(Issue::new(
            "name",
            if name.is_empty() {
                "missing".to_string()
            } else {
                format!("`{name}` is not a valid module name")
            },
            "use 1 to 63 lowercase letters, digits, `-` or `_`, starting with a letter or digit, e.g. `patient-portal`",
        ));
    }
    ModuleName(Arc::from(name))
}

fn validate_prefixes(raw: &[String], issues: &mut Vec<Issue>) -> Vec<PathPrefix> {
    if raw.is_empty() {
        issues.push(Issue::new(
            "prefixes",
            "a module needs at least one path prefix",
            "add e.g. `prefixes = [\"/patient_portal\"]` (or `[\"/\"]` for the EHR core)",
        ));
    }
    let mut out: Vec<PathPrefix> = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        let field = format!("prefixes[{i}]");
        let bad = |why: &str| {
            Issue::new(field.clone(), format!("`{p}` {why}"), "write an absolute path such as `/patient_portal` with no `..`, `//`, `%`, `?` or `#`")
        };
        if !p.starts_with('/') {
            issues.push(bad("does not start with `/`"));
            continue;
        }
        if p.contains("//")
            || p.bytes().any(|b| {
                b == b'%' || b == b'?' || b == b'#' || b == b'\\' || b <= b' ' || b == 0x7f
            })
            || p.split('/').any(|s| s == "." || s == "..")
        {
            issues.push(bad("is not a plain normalized path"));
            continue;
        }
        let trimmed = if p.len() > 1 {
            p.trim_end_matches('/')
        } else {
            p
        };
        let prefix = PathPrefix(Arc::from(trimmed));
        if out.contains(&prefix) {
            issues.push(Issue::new(
                field,
                format!("`{p}` is listed twice"),
                "remove the duplicate",
            ));
            continue;
        }
        out.push(prefix);
    }
    out
}

fn validate_hosts(raw: &[String], issues: &mut Vec<Issue>) -> Vec<HostPattern> {
    let mut out = Vec::new();
    for (i, h) in raw.iter().enumerate() {
        let lower = h.to_ascii_lowercase();
        let (wild, rest) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if rest.is_empty() || rest.len() > 253 || !rest.split('.').all(label_ok) {
            issues.push(Issue::new(
                format!("hosts[{i}]"),
                format!("`{h}` is not a host name"),
                "write a DNS name such as `ehr.example.org` or `*.example.org`, without port or scheme",
            ));
            continue;
        }
        out.push(if wild {
            HostPattern::Wildcard(Arc::from(format!(".{rest}")))
        } else {
            HostPattern::Exact(Arc::from(rest))
        });
    }
    out
}

fn validate_lb(raw: &RawManifest, issues: &mut Vec<Issue>) -> LoadBalancing {
    let hash_on = match raw.hash_on.as_deref() {
        None | Some("client_ip") => HashOn::ClientIp,
        Some(s) if s.starts_with("header:") && s.len() > 7 => {
            HashOn::Header(s[7..].to_ascii_lowercase())
        }
        Some(s) if s.starts_with("cookie:") && s.len() > 7 => HashOn::Cookie(s[7..].to_string()),
        Some(s) => {
            issues.push(Issue::new(
                "hash_on",
                format!("`{s}` is not a hash key"),
                "use `client_ip`, `header:NAME` or `cookie:NAME`",
            ));
            HashOn::ClientIp
        }
    };
    match raw.load_balancing.as_deref() {
        None | Some("round_robin") => {
            if raw.hash_on.is_some() {
                issues.push(Issue::new(
                    "hash_on",
                    "only used with `load_balancing = \"consistent_hash\"`",
                    "set `load_balancing = \"consistent_hash\"` or remove `hash_on`",
                ));
            }
            LoadBalancing::RoundRobin
        }
        Some("least_connections") => LoadBalancing::LeastConnections,
        Some("consistent_hash") => LoadBalancing::ConsistentHash(hash_on),
        Some(other) => {
            issues.push(Issue::new(
                "load_balancing",
                format!("`{other}` is not a load-balancing policy"),
                "use `round_robin`, `least_connections` or `consistent_hash`",
            ));
            LoadBalancing::RoundRobin
        }
    }
}

fn duration_field(
    field: &str,
    value: &Option<String>,
    default: Duration,
    issues: &mut Vec<Issue>,
) -> Duration {
    match value {
        None => default,
        Some(text) => match units::parse_duration(text) {
            Ok(d) if d.is_zero() => {
                issues.push(Issue::new(
                    field,
                    "must be longer than 0",
                    "write e.g. `5s`",
                ));
                default
            }
            Ok(d) => d,
            Err(e) => {
                issues.push(Issue::new(
                    field,
                    e,
                    "write a duration such as `5s`, `250ms` or `10m`",
                ));
                default
            }
        },
    }
}

fn parse_status_ranges(text: &str) -> Option<StatusRanges> {
    let mut ranges = Vec::new();
    for part in text.split(',').map(str::trim) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            None => {
                let n = part.parse().ok()?;
                (n, n)
            }
        };
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return None;
        }
        ranges.push((lo, hi));
    }
    Some(StatusRanges(ranges))
}

fn validate_health(raw: &RawManifest, issues: &mut Vec<Issue>) -> HealthCheckSpec {
    let d = HealthCheckSpec::default();
    let h = &raw.health_check;
    let path = h.path.clone().unwrap_or(d.path.clone());
    if !path.starts_with('/') || path.bytes().any(|b| b <= b' ') {
        issues.push(Issue::new(
            "health_check.path",
            format!("`{path}` is not an absolute request path"),
            "write e.g. `/` or `/interface/login/login.php`",
        ));
    }
    let expect_status = match &h.expect_status {
        None => d.expect_status.clone(),
        Some(text) => parse_status_ranges(text).unwrap_or_else(|| {
            issues.push(Issue::new(
                "health_check.expect_status",
                format!("`{text}` is not a list of status codes or ranges"),
                "write e.g. `200-399` or `200,302`",
            ));
            d.expect_status.clone()
        }),
    };
    let mut count = |field: &str, v: Option<u32>, default: u32| match v {
        Some(0) => {
            issues.push(Issue::new(
                field,
                "must be at least 1",
                "write a count such as 2",
            ));
            default
        }
        Some(n) => n,
        None => default,
    };
    let rise = count("health_check.rise", h.rise, d.rise);
    let fall = count("health_check.fall", h.fall, d.fall);
    let max_fails = count("health_check.max_fails", h.max_fails, d.max_fails);
    let interval = duration_field("health_check.interval", &h.interval, d.interval, issues);
    let timeout = duration_field("health_check.timeout", &h.timeout, d.timeout, issues);
    let fail_timeout = duration_field(
        "health_check.fail_timeout",
        &h.fail_timeout,
        d.fail_timeout,
        issues,
    );
    HealthCheckSpec {
        enabled: h.enabled.unwrap_or(true),
        path,
        host: h.host.clone(),
        expect_status,
        interval,
        timeout,
        rise,
        fall,
        max_fails,
        fail_timeout,
    }
}

fn validate_instances(raw: &[RawInstance], issues: &mut Vec<Issue>) -> Vec<InstanceSpec> {
    let mut out: Vec<InstanceSpec> = Vec::new();
    for (i, inst) in raw.iter().enumerate() {
        match validate_instance(inst) {
            Ok(spec) => {
                if out.iter().any(|o| o.id == spec.id) {
                    issues.push(Issue::new(
                        format!("instances[{i}].id"),
                        format!("instance id `{}` is used twice", spec.id),
                        "give every instance its own `id` (or a different address)",
                    ));
                } else {
                    out.push(spec);
                }
            }
            Err(errs) => issues.extend(
                errs.into_iter()
                    .map(|e| e.under(&format!("instances[{i}]"))),
            ),
        }
    }
    out
}

/// Validates one instance (also used for etcd instance keys).
pub fn validate_instance(raw: &RawInstance) -> Result<InstanceSpec, Vec<Issue>> {
    let mut issues = Vec::new();
    let addr = match raw.addr.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Some(a),
        _ => {
            issues.push(Issue::new(
                "addr",
                if raw.addr.is_empty() {
                    "missing".to_string()
                } else {
                    format!("`{}` is not an IP:PORT address", raw.addr)
                },
                "write an address such as `10.0.0.5:80` or `[fd00::5]:80`; for DNS names use discovery (docs/configuration.md)",
            ));
            None
        }
    };
    let weight = raw.weight.unwrap_or(1);
    if weight == 0 || weight > 1000 {
        issues.push(Issue::new(
            "weight",
            format!("{weight} is outside 1..=1000"),
            "use a weight from 1 to 1000; to stop new traffic to an instance set `draining = true`",
        ));
    }
    let id = match &raw.id {
        Some(id)
            if id.is_empty()
                || id.len() > 128
                || id.bytes().any(|b| b <= b' ' || b == b'/' || b == 0x7f) =>
        {
            issues.push(Issue::new(
                "id",
                format!("`{id}` is not a usable instance id"),
                "use up to 128 visible characters without `/`, e.g. `portal-7f9c`",
            ));
            None
        }
        Some(id) => Some(id.clone()),
        None => addr.map(|a| a.to_string()),
    };
    match (addr, id) {
        (Some(addr), Some(id)) if issues.is_empty() => Ok(InstanceSpec {
            id: InstanceId(Arc::from(id)),
            addr,
            weight,
            draining: raw.draining,
        }),
        _ => Err(issues),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_manifest_gets_defaults() {
        let spec = parse_toml_manifest(
            "name = \"labs\"\nprefixes = [\"/labs/\"]\n[[instances]]\naddr = \"127.0.0.1:9000\"\n",
            "labs.toml",
        )
        .unwrap();
        assert_eq!(spec.prefixes[0].as_str(), "/labs");
        assert_eq!(spec.max_body_size, DEFAULT_MAX_BODY);
        assert_eq!(spec.timeouts.read, Duration::from_secs(600));
        assert_eq!(spec.instances[0].id.as_str(), "127.0.0.1:9000");
        assert_eq!(spec.instances[0].weight, 1);
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let err = parse_toml_manifest(
            r#"
name = "Bad Name"
prefixes = ["labs", "/a/../b"]
hosts = ["http://x"]
load_balancing = "random"
max_body_size = "lots"
deny = ["/a/["]
[timeouts]
read = "forever"
[[instances]]
addr = "not-an-address"
weight = 0
"#,
            "modules/labs.toml",
        )
        .unwrap_err();
        let fields: Vec<_> = err.issues.iter().map(|i| i.field.as_str()).collect();
        for f in [
            "name",
            "prefixes[0]",
            "prefixes[1]",
            "hosts[0]",
            "load_balancing",
            "max_body_size",
            "deny[0]",
            "timeouts.read",
            "instances[0].addr",
            "instances[0].weight",
        ] {
            assert!(fields.contains(&f), "missing {f} in {fields:?}");
        }
        let text = err.to_string();
        assert!(
            text.contains("modules/labs.toml: instances[0].weight"),
            "{text}"
        );
        assert!(text.contains("fix:"), "{text}");
    }

    #[test]
    fn unknown_key_names_line_and_accepted_keys() {
        let err = parse_toml_manifest("name = \"a\"\nprefixs = [\"/\"]\n", "a.toml").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("a.toml: line 2 column 1"), "{text}");
        assert!(text.contains("unknown field `prefixs`"), "{text}");
        assert!(text.contains("prefixes"), "{text}");
    }

    #[test]
    fn json_manifest_matches_toml_schema() {
        let spec = parse_json_manifest(
            r#"{"name":"labs","prefixes":["/labs"],"load_balancing":"consistent_hash","hash_on":"cookie:PHPSESSID"}"#,
            "/space/modules/labs",
        )
        .unwrap();
        assert_eq!(
            spec.load_balancing,
            LoadBalancing::ConsistentHash(HashOn::Cookie("PHPSESSID".into()))
        );
    }

    #[test]
    fn wildcard_hosts_match_one_label() {
        let spec = parse_toml_manifest(
            "name = \"a\"\nprefixes = [\"/\"]\nhosts = [\"*.Example.org\"]\n",
            "a.toml",
        )
        .unwrap();
        let h = &spec.hosts[0];
        assert!(h.matches("ehr.example.org"));
        assert!(!h.matches("example.org"));
        assert!(!h.matches("a.b.example.org"));
    }
}
