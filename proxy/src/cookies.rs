//! Reading cookies from request headers without allocating, whichever way the request was
//! parsed: Pingora's [`RequestHeader`] or the HTTP/1 fast path's borrowed header list.
use pingora_http::RequestHeader;

/// The value of the first cookie named `name` in the given `Cookie` header values.
pub fn find_cookie_in<'r>(values: impl Iterator<Item = &'r [u8]>, name: &str) -> Option<&'r str> {
    values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v.trim_matches('"'))
        })
}

/// The value of the first cookie named `name` in any `Cookie` header.
pub fn find_cookie<'r>(req: &'r RequestHeader, name: &str) -> Option<&'r str> {
    find_cookie_in(
        req.headers
            .get_all(http::header::COOKIE)
            .iter()
            .map(|v| v.as_bytes()),
        name,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_named_cookie() {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        r.append_header("cookie", "a=1; PHPSESSID=abc; b=2")
            .unwrap();
        r.append_header("cookie", "LibreHealthEHR=\"xyz\"").unwrap();
        assert_eq!(find_cookie(&r, "PHPSESSID"), Some("abc"));
        assert_eq!(find_cookie(&r, "LibreHealthEHR"), Some("xyz"));
        assert_eq!(find_cookie(&r, "PHPSESS"), None);
    }
}
