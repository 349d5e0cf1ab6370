//! Reading cookies from request headers without allocating.
use pingora_http::RequestHeader;

/// The value of the first cookie named `name` in any `Cookie` header.
pub fn find_cookie<'r>(req: &'r RequestHeader, name: &str) -> Option<&'r str> {
    req.headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v.trim_matches('"'))
        })
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
