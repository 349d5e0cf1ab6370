//! Headers SPACE writes on the way to the backend and back: X-Forwarded-*, X-Request-Id,
//! and the removal of hop-by-hop headers.
use std::net::IpAddr;

use http::{header, HeaderName, HeaderValue};
use pingora_http::RequestHeader;

pub const X_REQUEST_ID: &str = "x-request-id";
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";
pub const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
pub const X_FORWARDED_HOST: &str = "x-forwarded-host";

/// Hop-by-hop headers (RFC 9110 §7.6.1) that never travel past SPACE. `Transfer-Encoding`
/// and `Content-Length` are left to Pingora, which owns message framing.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
];

/// The elements of a comma-separated field value (`Connection`, `Transfer-Encoding`),
/// trimmed.
pub(crate) fn list_tokens(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// A client-supplied request id is kept when it is 1 to 128 of `[A-Za-z0-9._:-]`.
pub fn is_well_formed_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A new random request id: 32 lowercase hex digits.
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    fill_request_id(&mut buf);
    HeaderValue::from_bytes(&buf).expect("hex digits are a valid header value")
}

/// Writes a new random request id (32 lowercase hex digits) into `buf`.
pub fn fill_request_id(buf: &mut [u8; 32]) {
    let n: u128 = rand::random();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((n >> (124 - 4 * i)) & 0xf) as usize];
    }
}

/// What the forwarding headers are built from.
pub struct Forwarding<'a> {
    pub client_ip: Option<IpAddr>,
    /// The peer is a configured trusted proxy: keep what it says.
    pub trusted: bool,
    pub proto: &'static str,
    pub request_id: &'a HeaderValue,
}

// The same names as `HeaderName`s, for lookups (a `&str` is parsed and hashed on every use).
// Insertions keep the `&'static str` forms: pingora_http copies a custom `HeaderName` into
// its case map, while a `&'static str` is borrowed.
const XFF: HeaderName = HeaderName::from_static(X_FORWARDED_FOR);
const XFP: HeaderName = HeaderName::from_static(X_FORWARDED_PROTO);
const XFH: HeaderName = HeaderName::from_static(X_FORWARDED_HOST);

/// Rewrites `req` for the backend: X-Forwarded-* and X-Request-Id in.
///
/// Hop-by-hop headers are not touched here: when the request has any (see
/// [`has_hop_by_hop`]), `upstream_peer` sets Pingora's standard upstream request policy,
/// which removes them, and the fields the client's `Connection` names, before this runs.
/// [`remove_hop_by_hop`] does the same for a caller without that policy.
pub fn prepare_upstream_request(req: &mut RequestHeader, fwd: &Forwarding<'_>) {
    // Host: HTTP/2 clients send :authority only; HTTP/1.1 backends need Host.
    let mut host = req.headers.get(header::HOST).cloned();
    if host.is_none() {
        if let Some(authority) = req.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                let _ = req.insert_header(header::HOST, v.clone());
                host = Some(v);
            }
        }
    }

    // The client address, formatted on the stack (no per-request String).
    let mut ip_buf = [0u8; 48];
    let ip: Option<&[u8]> = fwd.client_ip.map(|ip| {
        let n = format_ip(ip, &mut ip_buf);
        &ip_buf[..n]
    });
    let prev = if fwd.trusted {
        req.headers.get(&XFF)
    } else {
        None
    };
    let xff = match (prev, ip) {
        (Some(prev), Some(ip)) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(ip);
            HeaderValue::from_bytes(&v).ok()
        }
        (_, Some(ip)) => HeaderValue::from_bytes(ip).ok(),
        _ => None,
    };
    match xff {
        Some(v) => {
            let _ = req.insert_header(X_FORWARDED_FOR, v);
        }
        None => {
            req.remove_header(&XFF);
        }
    }

    if !(fwd.trusted && req.headers.contains_key(&XFP)) {
        let _ = req.insert_header(X_FORWARDED_PROTO, HeaderValue::from_static(fwd.proto));
    }
    if !(fwd.trusted && req.headers.contains_key(&XFH)) {
        match host {
            Some(host) => {
                let _ = req.insert_header(X_FORWARDED_HOST, host);
            }
            None => {
                req.remove_header(&XFH);
            }
        }
    }
    if !fwd.trusted {
        req.remove_header(&header::FORWARDED);
    }
    let _ = req.insert_header(X_REQUEST_ID, fwd.request_id.clone());
}

/// Whether the request has a field Pingora's standard upstream request policy would strip
/// or rewrite (pingora-proxy 0.9.1 `sanitize_h1_upstream_request`: the standard hop-by-hop
/// set, `Connection` and what it names, `Upgrade`, `HTTP2-Settings`). Without one, that
/// policy changes nothing, and the `preserve` policy forwards the same request while
/// skipping about a dozen header-map lookups.
pub fn has_hop_by_hop(req: &RequestHeader) -> bool {
    req.headers.keys().any(|name| {
        matches!(
            name.as_str(),
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "http2-settings"
        )
    })
}

/// Writes `ip` as text into `buf`, returning the length. IPv4 by hand (core::fmt costs about
/// a thousand instructions per address, a tenth of that here); IPv6 through `Display`.
pub(crate) fn format_ip(ip: IpAddr, buf: &mut [u8; 48]) -> usize {
    match ip {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            n
        }
        IpAddr::V6(_) => {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(cursor, "{ip}");
            cursor.position() as usize
        }
    }
}

/// Removes hop-by-hop headers and any header the Connection header names, except what a
/// protocol upgrade (WebSocket) needs.
pub fn remove_hop_by_hop(req: &mut RequestHeader) {
    let connection = req.headers.get(header::CONNECTION).cloned();
    let upgrade = connection
        .as_ref()
        .is_some_and(|c| list_tokens(c.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"upgrade")))
        && req.headers.contains_key(header::UPGRADE);
    if let Some(conn) = &connection {
        for token in list_tokens(conn.as_bytes()) {
            if token.is_empty()
                || token.eq_ignore_ascii_case(b"close")
                || token.eq_ignore_ascii_case(b"keep-alive")
                || token.eq_ignore_ascii_case(b"upgrade")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                // Never let a client strip what SPACE itself relies on.
                if name != header::HOST && name.as_str() != X_REQUEST_ID {
                    req.remove_header(&name);
                }
            }
        }
    }
    for name in &HOP_BY_HOP {
        if req.headers.contains_key(name) {
            req.remove_header(name);
        }
    }
    if upgrade {
        let _ = req.insert_header(header::CONNECTION, "upgrade");
    } else if req.headers.contains_key(header::UPGRADE) {
        req.remove_header(&header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/x", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn get<'a>(r: &'a RequestHeader, k: &str) -> Option<&'a str> {
        r.headers.get(k).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn untrusted_peer_cannot_forge_forwarding_headers() {
        let id = HeaderValue::from_static("abc");
        let mut r = req(&[
            ("host", "ehr.example.org"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
            ("forwarded", "for=6.6.6.6"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
        ]);
        remove_hop_by_hop(&mut r);
        prepare_upstream_request(
            &mut r,
            &Forwarding {
                client_ip: Some("192.0.2.1".parse().unwrap()),
                trusted: false,
                proto: "http",
                request_id: &id,
            },
        );
        assert_eq!(get(&r, "x-forwarded-for"), Some("192.0.2.1"));
        assert_eq!(get(&r, "x-forwarded-proto"), Some("http"));
        assert_eq!(get(&r, "x-forwarded-host"), Some("ehr.example.org"));
        assert_eq!(get(&r, "host"), Some("ehr.example.org"));
        assert_eq!(get(&r, "x-request-id"), Some("abc"));
        for gone in ["forwarded", "connection", "x-secret", "keep-alive"] {
            assert!(r.headers.get(gone).is_none(), "{gone} should be removed");
        }
    }

    #[test]
    fn trusted_peer_chain_is_appended() {
        let id = HeaderValue::from_static("abc");
        let mut r = req(&[
            ("host", "h"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
        ]);
        prepare_upstream_request(
            &mut r,
            &Forwarding {
                client_ip: Some("10.0.0.2".parse().unwrap()),
                trusted: true,
                proto: "http",
                request_id: &id,
            },
        );
        assert_eq!(get(&r, "x-forwarded-for"), Some("203.0.113.9, 10.0.0.2"));
        assert_eq!(get(&r, "x-forwarded-proto"), Some("https"));
    }

    #[test]
    fn websocket_upgrade_survives() {
        let id = HeaderValue::from_static("abc");
        let mut r = req(&[
            ("host", "h"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        remove_hop_by_hop(&mut r);
        prepare_upstream_request(
            &mut r,
            &Forwarding {
                client_ip: None,
                trusted: false,
                proto: "http",
                request_id: &id,
            },
        );
        assert_eq!(get(&r, "upgrade"), Some("websocket"));
        assert_eq!(get(&r, "connection"), Some("upgrade"));
    }

    #[test]
    fn ip_formatting_matches_display() {
        let mut buf = [0u8; 48];
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "192.0.2.9",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let n = format_ip(ip, &mut buf);
            assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn hop_by_hop_detection() {
        assert!(!has_hop_by_hop(&req(&[("host", "h"), ("accept", "*/*")])));
        for name in [
            "Connection",
            "keep-alive",
            "Proxy-Connection",
            "Proxy-Authorization",
            "proxy-authenticate",
            "TE",
            "trailer",
            "Transfer-Encoding",
            "Upgrade",
            "HTTP2-Settings",
        ] {
            assert!(
                has_hop_by_hop(&req(&[("host", "h"), (name, "x")])),
                "{name}"
            );
        }
    }

    #[test]
    fn request_ids() {
        assert!(is_well_formed_request_id(b"0f3c-aa.b:c_d"));
        assert!(!is_well_formed_request_id(b""));
        assert!(!is_well_formed_request_id(b"a b"));
        assert!(!is_well_formed_request_id(&[b'a'; 129]));
        let id = new_request_id();
        assert_eq!(id.len(), 32);
        assert_ne!(id, new_request_id());
    }
}
