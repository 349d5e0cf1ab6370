//! Request-path normalization, done before routing and deny rules so that
//! `/patient_portal/../sites/default/documents/x` cannot slip past either.
//!
//! Rules: percent-escapes of unreserved characters are decoded (`%2e` is `.`), other escapes
//! are kept with uppercase hex; backslashes count as `/`; runs of `/` collapse; `.` and `..`
//! segments are resolved. Refused with 400: a path that climbs above the root, an encoded
//! `/`, `\` or NUL, a malformed escape, control characters, or a path not starting with `/`.
use std::borrow::Cow;

/// Why a path is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with `/`")]
    NotAbsolute,
    #[error("the path climbs above the root")]
    EscapesRoot,
    #[error("the path holds an encoded slash or backslash")]
    EncodedSlash,
    #[error("the path holds a NUL or control character")]
    ControlCharacter,
    #[error("the path holds a malformed percent-escape")]
    BadEscape,
}

fn needs_work(path: &[u8]) -> bool {
    let mut prev = 0u8;
    for &b in path {
        match b {
            b'%' | b'\\' => return true,
            b'/' if prev == b'/' => return true,
            b'.' if prev == b'/' => return true,
            0..=0x1f | 0x7f => return true,
            _ => {}
        }
        prev = b;
    }
    false
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalizes a request path (without query). Borrows when nothing needs changing.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if !needs_work(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    // 1. decode unreserved escapes, map `\` to `/`, refuse the dangerous ones.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (h, l) = match (
                    bytes.get(i + 1).and_then(|&c| hex(c)),
                    bytes.get(i + 2).and_then(|&c| hex(c)),
                ) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(PathError::BadEscape),
                };
                let v = h << 4 | l;
                match v {
                    b'/' | b'\\' => return Err(PathError::EncodedSlash),
                    0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                    v if is_unreserved(v) => decoded.push(v),
                    v => {
                        decoded.push(b'%');
                        decoded.push(b"0123456789ABCDEF"[(v >> 4) as usize]);
                        decoded.push(b"0123456789ABCDEF"[(v & 15) as usize]);
                    }
                }
                i += 3;
            }
            b'\\' => {
                decoded.push(b'/');
                i += 1;
            }
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            _ => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    // 2. collapse slashes and resolve dot segments.
    let mut out: Vec<u8> = Vec::with_capacity(decoded.len());
    let ends_with_slash =
        decoded.ends_with(b"/") || decoded.ends_with(b"/.") || decoded.ends_with(b"/..");
    for segment in decoded.split(|&c| c == b'/') {
        match segment {
            b"" | b"." => {}
            b".." => {
                if out.is_empty() {
                    return Err(PathError::EscapesRoot);
                }
                let cut = out.iter().rposition(|&c| c == b'/').unwrap_or(0);
                out.truncate(cut);
            }
            seg => {
                out.push(b'/');
                out.extend_from_slice(seg);
            }
        }
    }
    if out.is_empty() || ends_with_slash {
        out.push(b'/');
    }
    // Only ASCII bytes were added or removed around valid UTF-8 input, so this holds.
    Ok(Cow::Owned(
        String::from_utf8(out).map_err(|_| PathError::BadEscape)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize_path(p).map(|c| c.into_owned())
    }

    #[test]
    fn plain_paths_are_borrowed() {
        assert!(matches!(
            normalize_path("/interface/main.php"),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(normalize_path("/"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn traversal_variants_resolve_or_refuse() {
        assert_eq!(
            n("/patient_portal/../sites/default/documents/x").unwrap(),
            "/sites/default/documents/x"
        );
        assert_eq!(n("/patient_portal/%2e%2e/sites/x").unwrap(), "/sites/x");
        assert_eq!(n("/patient_portal/%2E%2e/sites/x").unwrap(), "/sites/x");
        assert_eq!(
            n("//sites//default///documents/x").unwrap(),
            "/sites/default/documents/x"
        );
        assert_eq!(n("/patient_portal\\..\\sites\\x").unwrap(), "/sites/x");
        assert_eq!(n("/a/./b/.").unwrap(), "/a/b/");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/a/.hidden").unwrap(), "/a/.hidden");
        assert_eq!(n("/a/..b").unwrap(), "/a/..b");
        assert_eq!(n("/..").unwrap_err(), PathError::EscapesRoot);
        assert_eq!(
            n("/a/../../etc/passwd").unwrap_err(),
            PathError::EscapesRoot
        );
        assert_eq!(n("/%2e%2e/etc").unwrap_err(), PathError::EscapesRoot);
    }

    #[test]
    fn dangerous_escapes_are_refused() {
        assert_eq!(n("/a%2fb").unwrap_err(), PathError::EncodedSlash);
        assert_eq!(n("/a%5Cb").unwrap_err(), PathError::EncodedSlash);
        assert_eq!(n("/a%00b").unwrap_err(), PathError::ControlCharacter);
        assert_eq!(n("/a%zz").unwrap_err(), PathError::BadEscape);
        assert_eq!(n("/a%2").unwrap_err(), PathError::BadEscape);
        assert_eq!(n("a/b").unwrap_err(), PathError::NotAbsolute);
    }

    #[test]
    fn unreserved_escapes_decode_others_stay() {
        assert_eq!(n("/%7Euser/%41").unwrap(), "/~user/A");
        assert_eq!(n("/a%20b").unwrap(), "/a%20b");
        assert_eq!(n("/a%3fb").unwrap(), "/a%3Fb");
    }
}
