//! The client's HTTP/1.1 request head on the fast path: parsed in place, checked for what
//! the fast path serves, and written out again for the backend with SPACE's forwarding
//! headers.
//!
//! The fast path serves the common request: HTTP/1.1, origin-form target, one `Host`, no
//! body or one `Content-Length`. Anything else (`Transfer-Encoding`, `Expect`, `Upgrade`,
//! HTTP/1.0, extra hop-by-hop names in `Connection`, a head that does not parse) is handed,
//! bytes and all, to the Pingora request path, which owns those cases and their refusals.
//! The head sent upstream is rebuilt field by field from the parsed head, so framing the
//! backend sees is canonical (CRLF, one `Content-Length`) whatever the client sent.
use std::net::IpAddr;

use crate::headers::{format_ip, list_tokens};

/// Most header fields in a head the fast path parses: more in a request goes to Pingora,
/// more in a response is answered 502.
pub const MAX_HEADERS: usize = 96;

/// A request head the fast path serves, borrowed from the connection's read buffer.
#[derive(Debug)]
pub struct RequestHead<'b> {
    pub method: &'b str,
    /// The request target as sent: path and query.
    pub target: &'b str,
    /// The target up to `?`.
    pub path: &'b str,
    /// The `Host` field as sent (may carry a port).
    pub host: &'b str,
    pub headers: &'b [httparse::Header<'b>],
    /// Length of the head, through the blank line.
    pub len: usize,
    pub content_length: u64,
    /// The client sent `Connection: close`.
    pub close: bool,
}

impl RequestHead<'_> {
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// Values of the fields named `name` (any case).
    pub fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

impl crate::affinity::RequestFields for RequestHead<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        crate::cookies::find_cookie_in(self.values("cookie"), name)
    }
}

/// Where a complete head ends in `buf`, if it holds one.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    if let Some(i) = memchr::memmem::find(buf, b"\r\n\r\n") {
        return Some(i + 4);
    }
    // Bare-LF line ends are legal for a recipient to accept (RFC 9112 §2.2); rare.
    memchr::memmem::find(buf, b"\n\n").map(|i| i + 2)
}

/// Parses the complete head at the start of `buf`. `Err` names why the fast path does not
/// serve it (Pingora's request path will, or will refuse it).
pub fn parse<'b>(
    buf: &'b [u8],
    headers: &'b mut [httparse::Header<'b>; MAX_HEADERS],
) -> Result<RequestHead<'b>, &'static str> {
    let mut req = httparse::Request::new(headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("partial head"),
        Err(_) => return Err("head does not parse"),
    };
    if req.version != Some(1) {
        return Err("not HTTP/1.1");
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err("no request line");
    };
    if !target.starts_with('/') || method == "CONNECT" {
        return Err("not origin-form");
    }
    let mut host = None;
    let mut content_length = None;
    let mut close = false;
    for h in req.headers.iter() {
        match field_class(h.name) {
            Field::Host => {
                if host.is_some() {
                    return Err("two Host fields");
                }
                host = Some(std::str::from_utf8(h.value).map_err(|_| "Host not UTF-8")?);
            }
            Field::ContentLength => {
                if content_length.is_some() {
                    return Err("two Content-Length fields");
                }
                content_length = Some(parse_length(h.value).ok_or("bad Content-Length")?);
            }
            Field::Connection => {
                for token in list_tokens(h.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        return Err("Connection names other fields");
                    }
                }
            }
            Field::NotServed => return Err("framing or upgrade field"),
            _ => {}
        }
    }
    let host = host.filter(|h| !h.is_empty()).ok_or("no Host")?;
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Ok(RequestHead {
        method,
        target,
        path,
        host,
        headers: req.headers,
        len,
        content_length: content_length.unwrap_or(0),
        close,
    })
}

/// `1*DIGIT`, nothing else (no sign, no spaces, no list).
pub fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// What the fast path does with a request field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Host,
    ContentLength,
    Connection,
    /// Hop-by-hop, or SPACE writes its own: not forwarded.
    Drop,
    XForwardedFor,
    XForwardedProto,
    XForwardedHost,
    Forwarded,
    /// The fast path hands the request to Pingora.
    NotServed,
    Other,
}

fn field_class(name: &str) -> Field {
    let is = |s: &str| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 if is("te") => Field::Drop,
        4 if is("host") => Field::Host,
        6 if is("expect") => Field::NotServed,
        7 if is("upgrade") => Field::NotServed,
        7 if is("trailer") => Field::Drop,
        9 if is("forwarded") => Field::Forwarded,
        10 if is("connection") => Field::Connection,
        10 if is("keep-alive") => Field::Drop,
        12 if is("x-request-id") => Field::Drop,
        14 if is("content-length") => Field::ContentLength,
        14 if is("http2-settings") => Field::NotServed,
        15 if is("x-forwarded-for") => Field::XForwardedFor,
        16 if is("proxy-connection") => Field::Drop,
        16 if is("x-forwarded-host") => Field::XForwardedHost,
        17 if is("transfer-encoding") => Field::NotServed,
        17 if is("x-forwarded-proto") => Field::XForwardedProto,
        18 if is("proxy-authenticate") => Field::Drop,
        19 if is("proxy-authorization") => Field::Drop,
        _ => Field::Other,
    }
}

/// What the forwarding headers are built from (the fast path's [`crate::headers::Forwarding`]).
pub struct Forwarding<'a> {
    pub client_ip: Option<IpAddr>,
    /// The peer is a configured trusted proxy: keep what it says.
    pub trusted: bool,
    pub proto: &'static str,
    pub request_id: &'a [u8],
}

/// Writes the head for the backend into `out`: the request line as sent (HTTP/1.1), every
/// end-to-end field in the client's order, then `X-Forwarded-For/-Proto/-Host` and
/// `X-Request-Id` (the same rules as [`crate::headers::prepare_upstream_request`]).
pub fn write_upstream_head(out: &mut Vec<u8>, head: &RequestHead<'_>, fwd: &Forwarding<'_>) {
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut xff_kept = false;
    let (mut xfp_kept, mut xfh_kept) = (false, false);
    // A trusted peer's chain is extended after its last X-Forwarded-For field.
    let last_xff = if fwd.trusted {
        head.headers
            .iter()
            .rposition(|h| field_class(h.name) == Field::XForwardedFor)
    } else {
        None
    };
    for (i, h) in head.headers.iter().enumerate() {
        match field_class(h.name) {
            Field::Drop | Field::Connection | Field::NotServed => continue,
            Field::XForwardedFor => {
                if fwd.trusted {
                    out.extend_from_slice(b"x-forwarded-for: ");
                    out.extend_from_slice(h.value);
                    if let Some(ip) = fwd.client_ip.filter(|_| Some(i) == last_xff) {
                        out.extend_from_slice(b", ");
                        push_ip(out, ip);
                    }
                    out.extend_from_slice(b"\r\n");
                    xff_kept = true;
                }
                continue;
            }
            Field::XForwardedProto if !fwd.trusted => continue,
            Field::XForwardedHost if !fwd.trusted => continue,
            Field::Forwarded if !fwd.trusted => continue,
            Field::XForwardedProto => xfp_kept = true,
            Field::XForwardedHost => xfh_kept = true,
            _ => {}
        }
        push_field(out, h.name.as_bytes(), h.value);
    }
    if !xff_kept {
        if let Some(ip) = fwd.client_ip {
            out.extend_from_slice(b"x-forwarded-for: ");
            push_ip(out, ip);
            out.extend_from_slice(b"\r\n");
        }
    }
    if !xfp_kept {
        push_field(out, b"x-forwarded-proto", fwd.proto.as_bytes());
    }
    if !xfh_kept {
        push_field(out, b"x-forwarded-host", head.host.as_bytes());
    }
    push_field(out, b"x-request-id", fwd.request_id);
    out.extend_from_slice(b"\r\n");
}

pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    let mut buf = [0u8; 48];
    let n = format_ip(ip, &mut buf);
    out.extend_from_slice(&buf[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &str) -> Result<String, &'static str> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let head = parse(raw.as_bytes(), &mut headers)?;
        Ok(format!(
            "{} {} path={} host={} len={} cl={} close={}",
            head.method,
            head.target,
            head.path,
            head.host,
            head.len,
            head.content_length,
            head.close
        ))
    }

    #[test]
    fn serves_plain_requests() {
        let raw = "POST /a/b?x=1 HTTP/1.1\r\nHost: ehr.test:8080\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        assert_eq!(
            parsed(raw).unwrap(),
            format!(
                "POST /a/b?x=1 path=/a/b host=ehr.test:8080 len={} cl=5 close=true",
                raw.len() - 5
            )
        );
    }

    #[test]
    fn hands_off_what_it_does_not_serve() {
        for raw in [
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(parsed(raw).is_err(), "{raw:?} should go to Pingora");
        }
    }

    #[test]
    fn upstream_head_replaces_forwarding_fields_from_untrusted_peers() {
        let raw = "GET /x HTTP/1.1\r\nHost: ehr\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\nX-Request-Id: evil\r\nKeep-Alive: 5\r\nCookie: a=1\r\n\r\n";
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let head = parse(raw.as_bytes(), &mut headers).unwrap();
        let mut out = Vec::new();
        let fwd = Forwarding {
            client_ip: Some("192.0.2.1".parse().unwrap()),
            trusted: false,
            proto: "http",
            request_id: b"abc",
        };
        write_upstream_head(&mut out, &head, &fwd);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /x HTTP/1.1\r\nHost: ehr\r\nCookie: a=1\r\nx-forwarded-for: 192.0.2.1\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: ehr\r\nx-request-id: abc\r\n\r\n"
        );
    }

    #[test]
    fn upstream_head_extends_a_trusted_chain() {
        let raw = "GET /x HTTP/1.1\r\nHost: ehr\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n\r\n";
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let head = parse(raw.as_bytes(), &mut headers).unwrap();
        let mut out = Vec::new();
        let fwd = Forwarding {
            client_ip: Some("10.0.0.2".parse().unwrap()),
            trusted: true,
            proto: "http",
            request_id: b"abc",
        };
        write_upstream_head(&mut out, &head, &fwd);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /x HTTP/1.1\r\nHost: ehr\r\nx-forwarded-for: 203.0.113.9, 10.0.0.2\r\n\
             X-Forwarded-Proto: https\r\nx-forwarded-host: ehr\r\nx-request-id: abc\r\n\r\n"
        );
    }
}
