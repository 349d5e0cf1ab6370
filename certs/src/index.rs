//! SNI lookup: maps a ClientHello server name to a certificate. Order: exact SAN
//! name, then a wildcard SAN covering exactly one label (`*.example.org` matches
//! `a.example.org`, not `a.b.example.org` nor `example.org`), then the default.
//! Names compare case-insensitively and without a trailing dot.

use std::{borrow::Cow, collections::HashMap};

/// Immutable name → certificate index, built once per reload and swapped whole.
#[derive(Debug, Clone)]
pub(crate) struct SniIndex<T> {
    exact: HashMap<String, T>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, T>,
    default: Option<T>,
}

/// One pair's contribution to an index.
pub(crate) struct IndexEntry<'a, T> {
    pub names: &'a [String],
    /// Unix seconds; when two pairs claim a name, the later expiry wins.
    pub not_after: i64,
    pub value: T,
}

impl<T: Clone> SniIndex<T> {
    /// Builds the index. `entries` must come in pair-name order: on equal expiry the
    /// first pair claiming a name keeps it, so the choice is stable across reloads.
    pub fn build<'a>(
        entries: impl IntoIterator<Item = IndexEntry<'a, T>>,
        default: Option<T>,
    ) -> Self {
        let mut exact: HashMap<String, (i64, T)> = HashMap::new();
        let mut wildcard: HashMap<String, (i64, T)> = HashMap::new();
        for entry in entries {
            for name in entry.names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(rest) if !rest.is_empty() && !rest.contains('*') => (&mut wildcard, rest),
                    _ if name.contains('*') => {
                        tracing::debug!(%name, "ignoring partial wildcard name for SNI");
                        continue;
                    }
                    _ => (&mut exact, name.as_str()),
                };
                match map.get(key) {
                    Some((existing, _)) if *existing >= entry.not_after => {}
                    _ => {
                        map.insert(key.to_owned(), (entry.not_after, entry.value.clone()));
                    }
                }
            }
        }
        let strip =
            |m: HashMap<String, (i64, T)>| m.into_iter().map(|(k, (_, v))| (k, v)).collect();
        SniIndex {
            exact: strip(exact),
            wildcard: strip(wildcard),
            default,
        }
    }

    /// The certificate for a ClientHello's server name (`None` = no SNI sent).
    /// Returns `None` only when the index has no default, i.e. the store is empty.
    pub fn lookup(&self, sni: Option<&str>) -> Option<&T> {
        let Some(sni) = sni else {
            return self.default.as_ref();
        };
        let name = normalize(sni);
        if let Some(found) = self.exact.get(name.as_ref()) {
            return Some(found);
        }
        if let Some((first, rest)) = name.split_once('.') {
            if !first.is_empty() && !rest.is_empty() {
                if let Some(found) = self.wildcard.get(rest) {
                    return Some(found);
                }
            }
        }
        self.default.as_ref()
    }
}

/// Lowercase without a trailing dot; borrows when the name already is (the usual case,
/// so the handshake path does not allocate).
pub(crate) fn normalize(sni: &str) -> Cow<'_, str> {
    let trimmed = sni.trim_end_matches('.');
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        Cow::Borrowed(trimmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn index() -> SniIndex<&'static str> {
        let a = names(&["ehr.example.org", "portal.example.org"]);
        let b = names(&["*.example.org"]);
        let c = names(&["*.b.example.org", "a*.example.net"]);
        SniIndex::build(
            [
                IndexEntry {
                    names: &a,
                    not_after: 10,
                    value: "a",
                },
                IndexEntry {
                    names: &b,
                    not_after: 10,
                    value: "b",
                },
                IndexEntry {
                    names: &c,
                    not_after: 10,
                    value: "c",
                },
            ],
            Some("default"),
        )
    }

    #[test]
    fn exact_beats_wildcard() {
        let idx = index();
        assert_eq!(idx.lookup(Some("ehr.example.org")), Some(&"a"));
        assert_eq!(idx.lookup(Some("portal.example.org")), Some(&"a"));
        assert_eq!(idx.lookup(Some("other.example.org")), Some(&"b"));
    }

    #[test]
    fn wildcard_covers_exactly_one_label() {
        let idx = index();
        assert_eq!(idx.lookup(Some("x.y.example.org")), Some(&"default"));
        assert_eq!(idx.lookup(Some("example.org")), Some(&"default"));
        assert_eq!(idx.lookup(Some(".example.org")), Some(&"default"));
        assert_eq!(idx.lookup(Some("a.b.example.org")), Some(&"c"));
    }

    #[test]
    fn partial_wildcards_are_ignored() {
        let idx = index();
        assert_eq!(idx.lookup(Some("ab.example.net")), Some(&"default"));
    }

    #[test]
    fn compares_case_insensitively_and_ignores_trailing_dot() {
        let idx = index();
        assert_eq!(idx.lookup(Some("EHR.Example.ORG")), Some(&"a"));
        assert_eq!(idx.lookup(Some("ehr.example.org.")), Some(&"a"));
        assert_eq!(idx.lookup(Some("Other.EXAMPLE.org")), Some(&"b"));
    }

    #[test]
    fn no_sni_and_unknown_names_get_the_default() {
        let idx = index();
        assert_eq!(idx.lookup(None), Some(&"default"));
        assert_eq!(idx.lookup(Some("unknown.test")), Some(&"default"));
    }

    #[test]
    fn empty_index_returns_none() {
        let idx: SniIndex<&str> = SniIndex::build([], None);
        assert_eq!(idx.lookup(Some("ehr.example.org")), None);
        assert_eq!(idx.lookup(None), None);
    }

    #[test]
    fn later_expiry_wins_a_shared_name_and_ties_keep_the_first() {
        let old = names(&["ehr.example.org"]);
        let new = names(&["ehr.example.org", "*.example.org"]);
        let other = names(&["*.example.org"]);
        let idx = SniIndex::build(
            [
                IndexEntry {
                    names: &old,
                    not_after: 100,
                    value: "old",
                },
                IndexEntry {
                    names: &new,
                    not_after: 200,
                    value: "new",
                },
                IndexEntry {
                    names: &other,
                    not_after: 200,
                    value: "other",
                },
            ],
            None,
        );
        assert_eq!(idx.lookup(Some("ehr.example.org")), Some(&"new"));
        assert_eq!(idx.lookup(Some("x.example.org")), Some(&"new"));
    }
}
