//! Session affinity on the request path: follow a valid routing cookie to its instance,
//! fall back to a consistent hash of the backend's session cookie, and set or move the
//! routing cookie on the response. Counts every outcome; logs re-pins with a keyed hash of
//! the session id, never the id.
use http::{header, HeaderValue};
use pingora_http::ResponseHeader;
use space_registry::{
    AffinityKeys, CompiledModule, CookieVerdict, ModuleAffinity, ModuleStats, PickKey,
};

use crate::service::Affinity;

/// A request's header fields and cookies by name, whichever way the request was parsed
/// (Pingora's `RequestHeader`, or the HTTP/1 fast path's borrowed head).
pub(crate) trait RequestFields {
    /// The first field named `name` (lowercase).
    fn header(&self, name: &str) -> Option<&[u8]>;
    fn cookie(&self, name: &str) -> Option<&str>;
}

impl RequestFields for pingora_http::RequestHeader {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name).map(|v| v.as_bytes())
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        crate::cookies::find_cookie(self, name)
    }
}

/// The consistent-hash key a module's `load_balancing` names, from the request.
fn hash_key(
    on: &space_modules::HashOn,
    client_ip: Option<std::net::IpAddr>,
    req: &impl RequestFields,
) -> Option<PickKey> {
    use space_modules::HashOn;
    use std::net::IpAddr;
    match on {
        HashOn::ClientIp => client_ip.map(|ip| match ip {
            IpAddr::V4(v4) => PickKey::hash(&v4.octets()),
            IpAddr::V6(v6) => PickKey::hash(&v6.octets()),
        }),
        HashOn::Header(name) => req.header(name).map(PickKey::hash),
        HashOn::Cookie(name) => req.cookie(name).map(|v| PickKey::hash(v.as_bytes())),
    }
}

/// Picks the instance for a request, on both request paths: with affinity, a valid routing
/// cookie's instance or a hash of the session cookie; otherwise (or when those name none) the
/// module's load-balancing policy. Instances in `tried` are left out. Returns the instance
/// and what affinity decided, given what it decided for the request's earlier attempts.
pub(crate) fn pick(
    module: &CompiledModule,
    keys: Option<&AffinityKeys>,
    req: &impl RequestFields,
    client_ip: Option<std::net::IpAddr>,
    tried: &[u32],
    previous: Affinity,
) -> (Option<usize>, Affinity) {
    let (chosen, decision) = if module.affinity.is_some() {
        choose(module, keys, req, tried, previous)
    } else {
        (None, previous)
    };
    let chosen = chosen.or_else(|| {
        let key = match &module.spec.load_balancing {
            space_modules::LoadBalancing::ConsistentHash(on) => hash_key(on, client_ip, req),
            _ => None,
        };
        module
            .picker
            .pick(&module.instances, key, |i| tried.contains(&(i as u32)))
    });
    (chosen, decision)
}

/// Chooses the instance for a module with affinity. Returns `None` when the module's
/// load-balancing policy should choose (no cookie of any kind), with the decision to record.
fn choose(
    module: &CompiledModule,
    keys: Option<&AffinityKeys>,
    req: &impl RequestFields,
    tried: &[u32],
    previous: Affinity,
) -> (Option<usize>, Affinity) {
    let Some(aff) = &module.affinity else {
        return (None, Affinity::Off);
    };
    let stats = &module.stats;
    let mut decision = Affinity::New;
    match req.cookie(&aff.spec.cookie).map(|v| aff.verify(v)) {
        Some(CookieVerdict::Instance { index, current_key }) => {
            let inst = &module.instances[index];
            let within_drain = inst
                .state
                .draining_for()
                .is_none_or(|d| d < aff.spec.drain_timeout);
            if !tried.contains(&(index as u32)) && within_drain && inst.state.is_available() {
                if previous == Affinity::Off {
                    ModuleStats::bump(&stats.affinity_kept);
                }
                return (
                    Some(index),
                    if current_key {
                        Affinity::Kept
                    } else {
                        Affinity::Resign
                    },
                );
            }
            decision = Affinity::Repinned;
            if previous != Affinity::Repinned {
                ModuleStats::bump(&stats.affinity_repinned);
                let why = if tried.contains(&(index as u32)) {
                    "instance failed"
                } else if !within_drain {
                    "drain deadline passed"
                } else {
                    "instance down"
                };
                tracing::warn!(
                    module = %module.spec.name,
                    from_instance = %inst.spec.id,
                    reason = why,
                    session = %session_fingerprint(module, keys, req),
                    "session re-pinned to another instance"
                );
            }
        }
        Some(CookieVerdict::Unknown) | Some(CookieVerdict::Malformed)
            if previous == Affinity::Off =>
        {
            ModuleStats::bump(&stats.affinity_invalid);
            tracing::info!(
                module = %module.spec.name,
                session = %session_fingerprint(module, keys, req),
                "routing cookie ignored: it names no current instance (forged, stale or from a removed instance)"
            );
        }
        Some(_) => {}
        None => {}
    }
    if previous == Affinity::Repinned {
        decision = Affinity::Repinned;
    }
    // No usable routing cookie: a backend session cookie pins by consistent hash, so that
    // every replica agrees where the session lives.
    let session_value = module
        .spec
        .session_cookies
        .iter()
        .find_map(|name| req.cookie(name));
    if let Some(value) = session_value {
        let picked =
            module
                .picker
                .pick_hashed(&module.instances, PickKey::hash(value.as_bytes()), |i| {
                    tried.contains(&(i as u32))
                });
        if picked.is_some() {
            if previous == Affinity::Off {
                ModuleStats::bump(&stats.affinity_hash_fallback);
            }
            return (picked, decision);
        }
    }
    (None, decision)
}

fn session_fingerprint(
    module: &CompiledModule,
    keys: Option<&AffinityKeys>,
    req: &impl RequestFields,
) -> String {
    let id = module
        .spec
        .session_cookies
        .iter()
        .find_map(|name| req.cookie(name));
    match (id, keys) {
        (Some(id), Some(keys)) => keys.session_fingerprint(id),
        _ => "-".to_string(),
    }
}

/// The routing cookie to set when the request needs a (new or re-signed) pin: the
/// `Set-Cookie` value, or `None` when the client's cookie is current.
pub(crate) fn routing_cookie(
    module: &CompiledModule,
    aff: &ModuleAffinity,
    instance: usize,
    decision: Affinity,
    prefix_index: u16,
    tls: bool,
) -> Option<String> {
    if decision == Affinity::Kept {
        return None;
    }
    if decision == Affinity::New {
        ModuleStats::bump(&module.stats.affinity_new);
    }
    let path = module
        .spec
        .prefixes
        .get(prefix_index as usize)
        .map_or("/", |p| p.as_str());
    let mut cookie = format!(
        "{}={}; Path={path}; HttpOnly; SameSite=Lax",
        aff.spec.cookie, aff.cookie_values[instance]
    );
    if tls {
        cookie.push_str("; Secure");
    }
    if let Some(max_age) = aff.spec.max_age {
        cookie.push_str(&format!("; Max-Age={}", max_age.as_secs()));
    }
    Some(cookie)
}

/// Whether the backend's session cookies get `Secure`/`SameSite` added on this response.
pub(crate) fn hardens_session_cookies(aff: &ModuleAffinity, tls: bool) -> bool {
    tls && (aff.spec.secure_session_cookies || aff.spec.session_cookie_samesite.is_some())
}

/// A backend `Set-Cookie` value with `Secure` and the configured `SameSite` added, when it
/// sets one of the module's session cookies and lacks them; `None` leaves it as it is.
/// Never adds `HttpOnly`: LibreEHR's JavaScript rewrites its cookie.
pub(crate) fn hardened_session_cookie(
    module: &CompiledModule,
    aff: &ModuleAffinity,
    value: &[u8],
) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    let (name, _) = text.split_once('=')?;
    if !module.spec.session_cookies.iter().any(|c| c == name.trim()) {
        return None;
    }
    let has = |attr: &str| {
        text.split(';').any(|a| {
            a.trim_start()
                .as_bytes()
                .get(..attr.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(attr.as_bytes()))
        })
    };
    let add_secure = aff.spec.secure_session_cookies && !has("secure");
    let add_same_site = aff
        .spec
        .session_cookie_samesite
        .filter(|_| !has("samesite"));
    if !add_secure && add_same_site.is_none() {
        return None;
    }
    let mut out = text.to_string();
    if add_secure {
        out.push_str("; Secure");
    }
    if let Some(same_site) = add_same_site {
        out.push_str("; SameSite=");
        out.push_str(same_site.as_str());
    }
    Some(out)
}

/// Sets the routing cookie when the request needs a (new or re-signed) pin, and adds
/// `Secure`/`SameSite` to the backend's session cookies over HTTPS when configured.
pub(crate) fn decorate_response(
    module: &CompiledModule,
    aff: &ModuleAffinity,
    resp: &mut ResponseHeader,
    instance: usize,
    decision: Affinity,
    prefix_index: u16,
    tls: bool,
) {
    if let Some(cookie) = routing_cookie(module, aff, instance, decision, prefix_index, tls) {
        let _ = resp.append_header(header::SET_COOKIE, cookie);
    }
    if hardens_session_cookies(aff, tls) {
        harden_session_cookies(module, aff, resp);
    }
}

/// Rewrites the response's `Set-Cookie` fields with [`hardened_session_cookie`].
fn harden_session_cookies(
    module: &CompiledModule,
    aff: &ModuleAffinity,
    resp: &mut ResponseHeader,
) {
    let rewritten: Vec<Option<String>> = resp
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| hardened_session_cookie(module, aff, v.as_bytes()))
        .collect();
    if rewritten.iter().all(Option::is_none) {
        return;
    }
    let values: Vec<HeaderValue> = resp
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    resp.remove_header(&header::SET_COOKIE);
    for (v, new) in values.into_iter().zip(rewritten) {
        match new {
            Some(text) => {
                let _ = resp.append_header(header::SET_COOKIE, text);
            }
            None => {
                let _ = resp.append_header(header::SET_COOKIE, v);
            }
        }
    }
}
