//! HTTP clients for tests: reqwest clients that follow no redirects and ignore proxy
//! environment variables, a JSON GET, and raw-bytes requests over plain TCP for request
//! targets reqwest would normalize (`/a/../b`, `//`, `\`, `%2e%2e`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Overall timeout of the clients and raw requests in this module. Long, so a slow CI run is
/// not mistaken for a failure; it only bounds a hang.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A reqwest builder for tests: no redirects followed, no `HTTP(S)_PROXY` from the
/// environment, [`REQUEST_TIMEOUT`]. Add `.resolve(host, addr)` to send a name to loopback.
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
}

/// A plain client from [`client_builder`], without a cookie store.
pub fn client() -> reqwest::Client {
    client_builder().build().expect("build reqwest client")
}

/// Like [`client`] but keeps cookies between requests, like a browser (it honours `Secure`,
/// `Path` and `Domain`, so a `Secure` cookie is not sent over plain HTTP).
pub fn cookie_client() -> reqwest::Client {
    client_builder()
        .cookie_store(true)
        .build()
        .expect("build reqwest client")
}

/// A client that speaks HTTP/2 without TLS from the first byte (h2c prior knowledge).
pub fn h2c_client() -> reqwest::Client {
    client_builder()
        .http2_prior_knowledge()
        .build()
        .expect("build reqwest client")
}

/// GETs `url` with [`client`] and parses the body as JSON; panics (showing the body) if the
/// request fails or the body is not JSON.
pub async fn get_json(url: &str) -> (StatusCode, Value) {
    let response = client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url} failed: {e:?}"));
    let status = response.status();
    let body = response
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: reading body failed: {e:?}"));
    let json = serde_json::from_str(&body).unwrap_or_else(|e| {
        panic!("GET {url} answered {status} with a non-JSON body ({e}): {body}")
    });
    (status, json)
}

/// Writes `request` verbatim to a new TCP connection to `addr` and returns the raw response
/// (status line, headers, body) as text.
///
/// Reads one response: up to its `Content-Length`, the end of its chunked body, or EOF when it
/// has neither (HEAD, 204 and 304 end at the headers). Interim `1xx` responses are included.
/// Panics if nothing complete arrives within [`REQUEST_TIMEOUT`].
pub async fn raw_request(addr: SocketAddr, request: impl AsRef<[u8]>) -> String {
    let request = request.as_ref();
    let head_only = request.starts_with(b"HEAD ");
    let mut buf = Vec::new();
    let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if response_len(&buf, head_only).is_some() {
                break;
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    finish_raw(
        addr,
        request,
        buf,
        result.map_err(|_| "timed out".to_string()),
    )
}

/// Blocking [`raw_request`] (std TCP, no runtime needed).
pub fn raw_request_blocking(addr: SocketAddr, request: impl AsRef<[u8]>) -> String {
    let request = request.as_ref();
    let mut buf = Vec::new();
    let result = exchange_blocking(addr, request, REQUEST_TIMEOUT, &mut buf);
    finish_raw(addr, request, buf, Ok(result))
}

fn finish_raw(
    addr: SocketAddr,
    request: &[u8],
    buf: Vec<u8>,
    result: Result<std::io::Result<()>, String>,
) -> String {
    let text = String::from_utf8_lossy(&buf).into_owned();
    let failure = match result {
        Ok(Ok(())) if !buf.is_empty() => return text,
        Ok(Ok(())) => "connection closed before any response byte".to_string(),
        Ok(Err(e)) if !buf.is_empty() && is_reset(&e) => return text,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e,
    };
    panic!(
        "raw request to {addr} failed: {failure}\nrequest: {:?}\nreceived so far: {text:?}",
        String::from_utf8_lossy(request)
    )
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
    )
}

/// Connects, writes `request`, reads one response into `buf` (see [`raw_request`]).
fn exchange_blocking(
    addr: SocketAddr,
    request: &[u8],
    timeout: Duration,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let head_only = request.starts_with(b"HEAD ");
    let mut stream = TcpStream::connect_timeout(&addr, timeout.min(Duration::from_secs(5)))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(request)?;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if response_len(buf, head_only).is_some() {
            return Ok(());
        }
    }
}

/// The status code in the first status line of a raw response, e.g. `404` for
/// `"HTTP/1.1 404 Not Found\r\n..."`; panics if there is none.
pub fn status_of(raw: &str) -> u16 {
    raw.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {raw:?}"))
}

/// A parsed HTTP/1.1 response from the blocking helpers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawResponse {
    /// Status code of the final (non-1xx) response.
    pub status: u16,
    /// Header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Parses one complete response (skipping interim 1xx responses); `None` if `raw` is not
    /// a complete response.
    pub fn parse(raw: &[u8]) -> Option<RawResponse> {
        let head_start = skip_interim(raw)?;
        let rest = &raw[head_start..];
        let head_end = find(rest, b"\r\n\r\n")? + 4;
        let head = std::str::from_utf8(&rest[..head_end]).ok()?;
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let body_bytes = &rest[head_end..];
        let chunked = headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
        });
        let body = if chunked {
            dechunk(body_bytes)?.0
        } else {
            match content_length(&headers) {
                Some(len) => body_bytes.get(..len)?.to_vec(),
                None => body_bytes.to_vec(),
            }
        };
        Some(RawResponse {
            status,
            headers,
            body,
        })
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics showing the body if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Blocking `GET path` with `Connection: close` (std TCP, no runtime, 10 s timeout).
/// Returns an error instead of panicking, for polling loops.
pub fn get_blocking(addr: SocketAddr, path: &str) -> std::io::Result<RawResponse> {
    request_blocking(addr, "GET", path, None)
}

/// Blocking `POST path` with a JSON body and `Connection: close` (10 s timeout).
pub fn post_json_blocking(
    addr: SocketAddr,
    path: &str,
    body: &Value,
) -> std::io::Result<RawResponse> {
    request_blocking(addr, "POST", path, Some(body.to_string().as_bytes()))
}

fn request_blocking(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<RawResponse> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    let mut buf = Vec::new();
    match exchange_blocking(addr, &bytes, Duration::from_secs(10), &mut buf) {
        Ok(()) => {}
        Err(e) if buf.is_empty() || !is_reset(&e) => return Err(e),
        Err(_) => {}
    }
    RawResponse::parse(&buf).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "incomplete HTTP response: {:?}",
                String::from_utf8_lossy(&buf)
            ),
        )
    })
}

/// If `buf` holds a complete response, its length in bytes; `None` if more must be read
/// (including "read until EOF" responses).
fn response_len(buf: &[u8], head_only: bool) -> Option<usize> {
    let start = skip_interim(buf)?;
    let rest = &buf[start..];
    let head_end = find(rest, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&rest[..head_end]).to_ascii_lowercase();
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    if head_only || status == 204 || status == 304 || status == 101 {
        return Some(start + head_end);
    }
    let headers: Vec<(String, String)> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        let (_, used) = dechunk(&rest[head_end..])?;
        return Some(start + head_end + used);
    }
    let len = content_length(&headers)?;
    (rest.len() >= head_end + len).then_some(start + head_end + len)
}

/// Offset of the first non-1xx response in `buf` (skipping `100 Continue` and friends, but
/// not `101 Switching Protocols`); `None` if an interim response is still incomplete.
fn skip_interim(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    loop {
        let rest = &buf[start..];
        let status = rest
            .split(|b| *b == b' ')
            .nth(1)
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<u16>().ok());
        match status {
            Some(s) if (100..200).contains(&s) && s != 101 => {
                start += find(rest, b"\r\n\r\n")? + 4;
            }
            _ => return Some(start),
        }
    }
}

fn content_length(headers: &[(String, String)]) -> Option<usize> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
}

/// Decodes a complete chunked body: `(data, bytes consumed)`, or `None` if incomplete.
fn dechunk(mut body: &[u8]) -> Option<(Vec<u8>, usize)> {
    let total = body.len();
    let mut data = Vec::new();
    loop {
        let line_end = find(body, b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            // Trailers end with an empty line.
            loop {
                let end = find(body, b"\r\n")?;
                body = &body[end + 2..];
                if end == 0 {
                    return Some((data, total - body.len()));
                }
            }
        }
        data.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_responses_are_recognised() {
        let cl = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
        assert_eq!(response_len(cl, false), Some(cl.len()));
        assert_eq!(response_len(&cl[..cl.len() - 1], false), None);

        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n3\r\nyou\r\n0\r\n\r\n";
        assert_eq!(response_len(chunked, false), Some(chunked.len()));
        let parsed = RawResponse::parse(chunked).unwrap();
        assert_eq!(parsed.body, b"hiyou");

        let interim =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(response_len(interim, false), Some(interim.len()));
        assert_eq!(RawResponse::parse(interim).unwrap().status, 404);

        let eof = b"HTTP/1.0 200 OK\r\n\r\nuntil close";
        assert_eq!(response_len(eof, false), None);
        assert_eq!(
            response_len(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
            Some(38)
        );
        assert_eq!(status_of("HTTP/1.1 403 Forbidden\r\n"), 403);
    }
}
