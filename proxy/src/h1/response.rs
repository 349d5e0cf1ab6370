//! The backend's response on the fast path: its head parsed and rewritten for the client
//! (hop-by-hop fields out; X-Request-Id, HSTS and the routing cookie in), and its body
//! framing (RFC 9112 §6.3), so the relay knows where the response ends and whether the
//! backend connection can be used again.
use space_registry::{CompiledModule, ModuleAffinity};

use super::request::{parse_length, push_field, MAX_HEADERS};
use crate::{affinity, headers::list_tokens, service::Affinity};

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    Length(u64),
    /// Chunked, relayed as it is; [`ChunkedEnd`] finds its end.
    Chunked,
    /// Until the backend closes: the client connection closes after it too.
    UntilClose,
}

/// What the relay needs to know about a response whose head was written for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseMeta {
    pub status: u16,
    /// Length of the backend's head in its buffer.
    pub head_len: usize,
    pub framing: Framing,
    /// The backend keeps the connection open after this response.
    pub backend_keepalive: bool,
}

/// What SPACE adds to a response head.
#[derive(Clone, Copy)]
pub struct Decorations<'a> {
    pub request_id: &'a [u8],
    /// `Strict-Transport-Security`, over TLS when configured (replaces the backend's).
    pub hsts: Option<&'a [u8]>,
    /// Session affinity of the module, when it has it.
    pub affinity: Option<Pin<'a>>,
    /// Tell the client the connection closes after this response.
    pub close: bool,
}

/// Where affinity sent the request, for the routing cookie and the session-cookie hardening
/// (the same functions SpaceProxy::response_filter calls, called as late: once the backend
/// has answered).
#[derive(Clone, Copy)]
pub struct Pin<'a> {
    pub module: &'a CompiledModule,
    pub affinity: &'a ModuleAffinity,
    pub instance: usize,
    pub decision: Affinity,
    pub prefix_index: u16,
    pub tls: bool,
}

/// Parsing the backend's head.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// An interim (1xx) response of `n` bytes: dropped, the final one follows.
    Interim(usize),
    Final(ResponseMeta),
}

/// Parses the backend's head at the start of `buf` and, once it is complete and final,
/// writes the client's head into `out`. `Err` says why the response cannot be relayed (502).
pub fn parse_and_rewrite(
    buf: &[u8],
    request_is_head: bool,
    deco: &Decorations<'_>,
    out: &mut Vec<u8>,
) -> Result<Parsed, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(_) => return Err("response head does not parse"),
    };
    let status = resp.code.ok_or("no status")?;
    if status == 101 {
        return Err("101 to a request that asked for no upgrade");
    }
    if (100..200).contains(&status) {
        return Ok(Parsed::Interim(head_len));
    }
    let http11 = resp.version == Some(1);
    let mut keepalive = http11;
    let mut length: Option<u64> = None;
    let mut chunked = None;
    for h in resp.headers.iter() {
        match field_class(h.name) {
            Field::ContentLength => {
                let n = parse_length(h.value).ok_or("bad Content-Length")?;
                if length.is_some_and(|l| l != n) {
                    return Err("conflicting Content-Length");
                }
                length = Some(n);
            }
            Field::TransferEncoding => {
                // The final coding decides; anything but chunked last is read until close.
                let last = list_tokens(h.value).next_back().unwrap_or(b"");
                chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
            Field::Connection => {
                for token in list_tokens(h.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        keepalive = false;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                        keepalive = true;
                    }
                }
            }
            _ => {}
        }
    }
    let framing = if request_is_head || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    if chunked.is_some() && length.is_some() {
        // Both: Transfer-Encoding wins, and the connection is not to be trusted again.
        keepalive = false;
    }
    let backend_keepalive = keepalive && framing != Framing::UntilClose;

    let reason = resp.reason.filter(|r| !r.is_empty()).unwrap_or_else(|| {
        http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("")
    });
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut code = [b'0'; 3];
    code[0] += (status / 100 % 10) as u8;
    code[1] += (status / 10 % 10) as u8;
    code[2] += (status % 10) as u8;
    out.extend_from_slice(&code);
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        match field_class(h.name) {
            // Framing and hop-by-hop fields are SPACE's to write; so is X-Request-Id.
            Field::ContentLength
            | Field::TransferEncoding
            | Field::Connection
            | Field::HopByHop
            | Field::RequestId => continue,
            Field::Hsts if deco.hsts.is_some() => continue,
            Field::SetCookie => {
                let hardened = deco
                    .affinity
                    .filter(|p| affinity::hardens_session_cookies(p.affinity, p.tls))
                    .and_then(|p| affinity::hardened_session_cookie(p.module, p.affinity, h.value));
                if let Some(v) = hardened {
                    push_field(out, h.name.as_bytes(), v.as_bytes());
                    continue;
                }
            }
            _ => {}
        }
        push_field(out, h.name.as_bytes(), h.value);
    }
    match framing {
        Framing::Chunked => push_field(out, b"transfer-encoding", b"chunked"),
        Framing::Length(n) => push_length(out, n),
        // HEAD, 304: the length the backend declared describes the body not sent.
        Framing::Empty if status != 204 => {
            if let Some(n) = length {
                push_length(out, n);
            }
        }
        Framing::Empty | Framing::UntilClose => {}
    }
    let cookie = deco.affinity.and_then(|p| {
        affinity::routing_cookie(
            p.module,
            p.affinity,
            p.instance,
            p.decision,
            p.prefix_index,
            p.tls,
        )
    });
    if let Some(cookie) = cookie {
        push_field(out, b"set-cookie", cookie.as_bytes());
    }
    push_field(out, b"x-request-id", deco.request_id);
    if let Some(hsts) = deco.hsts {
        push_field(out, b"strict-transport-security", hsts);
    }
    if deco.close || framing == Framing::UntilClose {
        push_field(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Parsed::Final(ResponseMeta {
        status,
        head_len,
        framing,
        backend_keepalive,
    }))
}

/// What the relay does with a response field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ContentLength,
    TransferEncoding,
    Connection,
    HopByHop,
    RequestId,
    Hsts,
    SetCookie,
    Other,
}

fn field_class(name: &str) -> Field {
    let is = |s: &str| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 if is("te") => Field::HopByHop,
        7 if is("trailer") || is("upgrade") => Field::HopByHop,
        10 if is("connection") => Field::Connection,
        10 if is("keep-alive") => Field::HopByHop,
        10 if is("set-cookie") => Field::SetCookie,
        12 if is("x-request-id") => Field::RequestId,
        14 if is("content-length") => Field::ContentLength,
        16 if is("proxy-connection") => Field::HopByHop,
        17 if is("transfer-encoding") => Field::TransferEncoding,
        25 if is("strict-transport-security") => Field::Hsts,
        _ => Field::Other,
    }
}

pub(super) fn push_length(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    push_field(out, b"content-length", &digits[i..]);
}

/// Finds the end of a chunked body as its bytes stream past, without changing them: chunk
/// sizes, extensions, data, the last chunk and the trailer section (RFC 9112 §7.1).
#[derive(Debug, Default)]
pub struct ChunkedEnd {
    state: ChunkState,
    size: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// After the size: extensions up to the line end.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerLineStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

impl ChunkedEnd {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Feeds the next bytes of the body. Returns how many of them belong to it (fewer than
    /// `bytes.len()` only when the body ended inside them), or `Err` on a framing error.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, &'static str> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.size >> 56 != 0 {
                            return Err("chunk size too large");
                        }
                        self.size = self.size * 16 + (b as char).to_digit(16).unwrap_or(0) as u64;
                    }
                    b';' | b' ' | b'\t' => self.state = Extension,
                    b'\r' => self.state = SizeLf,
                    b'\n' => self.end_size_line(),
                    _ => return Err("bad chunk size"),
                },
                Extension => match b {
                    b'\r' => self.state = SizeLf,
                    b'\n' => self.end_size_line(),
                    _ => {}
                },
                SizeLf => {
                    if b != b'\n' {
                        return Err("bad chunk size line");
                    }
                    self.end_size_line();
                }
                Data => {
                    let take = (self.size as usize).min(bytes.len() - i);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => match b {
                    b'\r' => self.state = DataLf,
                    b'\n' => self.state = Size,
                    _ => return Err("chunk data longer than its size"),
                },
                DataLf => {
                    if b != b'\n' {
                        return Err("chunk data longer than its size");
                    }
                    self.state = Size;
                }
                TrailerLineStart => match b {
                    b'\r' => self.state = EndLf,
                    b'\n' => {
                        self.state = Done;
                        return Ok(i + 1);
                    }
                    _ => self.state = TrailerLine,
                },
                TrailerLine => match b {
                    b'\r' => self.state = TrailerLf,
                    b'\n' => self.state = TrailerLineStart,
                    _ => {}
                },
                TrailerLf => {
                    if b != b'\n' {
                        return Err("bad trailer line");
                    }
                    self.state = TrailerLineStart;
                }
                EndLf => {
                    if b != b'\n' {
                        return Err("bad end of chunked body");
                    }
                    self.state = Done;
                    return Ok(i + 1);
                }
                Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }

    fn end_size_line(&mut self) {
        self.state = if self.size == 0 {
            ChunkState::TrailerLineStart
        } else {
            ChunkState::Data
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deco() -> Decorations<'static> {
        Decorations {
            request_id: b"rid",
            hsts: None,
            affinity: None,
            close: false,
        }
    }

    fn rewrite(raw: &str, head: bool) -> (Parsed, String) {
        let mut out = Vec::new();
        let p = parse_and_rewrite(raw.as_bytes(), head, &deco(), &mut out).unwrap();
        (p, String::from_utf8(out).unwrap())
    }

    #[test]
    fn length_framed_response_keeps_its_fields_and_gets_ours() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\nX-Request-Id: backend\r\nSet-Cookie: a=1\r\n\r\nhello";
        let (p, out) = rewrite(raw, false);
        let Parsed::Final(meta) = p else {
            panic!("{p:?}")
        };
        assert_eq!(meta.framing, Framing::Length(5));
        assert!(meta.backend_keepalive);
        assert_eq!(meta.head_len, raw.len() - 5);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\ncontent-length: 5\r\nx-request-id: rid\r\n\r\n"
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                false,
                Framing::UntilClose,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", false, Framing::UntilClose, false),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
                true,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\n",
                false,
                Framing::Length(9),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\n",
                false,
                Framing::Length(9),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 9\r\nConnection: keep-alive\r\n\r\n",
                false,
                Framing::Length(9),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                Framing::Chunked,
                false,
            ),
        ];
        for (raw, head, framing, keepalive) in cases {
            let (p, _) = rewrite(raw, head);
            let Parsed::Final(meta) = p else {
                panic!("{raw:?}: {p:?}")
            };
            assert_eq!(
                (meta.framing, meta.backend_keepalive),
                (framing, keepalive),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn refuses_what_cannot_be_relayed() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
        ] {
            let mut out = Vec::new();
            assert!(
                parse_and_rewrite(raw.as_bytes(), false, &deco(), &mut out).is_err(),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn interim_responses_are_skipped() {
        let raw = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n";
        let (p, out) = rewrite(raw, false);
        assert_eq!(p, Parsed::Interim(25));
        assert!(out.is_empty());
    }

    #[test]
    fn chunked_end_is_found_across_splits_and_trailers() {
        let body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..body.len() {
            let mut c = ChunkedEnd::default();
            let a = c.feed(&body[..split]).unwrap();
            assert_eq!(a, split.min(end));
            if split >= end {
                assert!(c.is_done());
                continue;
            }
            let b = c.feed(&body[split..]).unwrap();
            assert_eq!(split + b, end, "split at {split}");
            assert!(c.is_done());
        }
        let mut c = ChunkedEnd::default();
        assert!(c.feed(b"5\r\nhello!\r\n").is_err());
        let mut c = ChunkedEnd::default();
        assert!(c.feed(b"zz\r\n").is_err());
    }
}
