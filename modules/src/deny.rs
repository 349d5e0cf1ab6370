//! Deny rules: glob patterns over the normalized request path that SPACE answers with 404
//! itself, for files that only an Apache `.htaccess` would otherwise protect.
//!
//! `*` matches within one path segment, `**` across segments; a pattern ending in `/**`
//! also denies the directory itself (`/sql/**` denies `/sql` and `/sql/`).
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Compiled deny patterns of one module.
#[derive(Debug, Clone)]
pub struct DenyRules {
    patterns: Vec<String>,
    set: GlobSet,
}

/// A deny pattern that does not parse.
#[derive(Debug, Clone, thiserror::Error)]
#[error("deny pattern `{pattern}` does not parse: {reason}")]
pub struct DenyRulesError {
    pub index: usize,
    pub pattern: String,
    pub reason: String,
}

impl Default for DenyRules {
    fn default() -> Self {
        DenyRules {
            patterns: Vec::new(),
            set: GlobSet::empty(),
        }
    }
}

impl DenyRules {
    /// Compiles `patterns`; every pattern must start with `/` or `**`.
    pub fn new(patterns: &[String]) -> Result<DenyRules, Vec<DenyRulesError>> {
        let mut builder = GlobSetBuilder::new();
        let mut errors = Vec::new();
        for (index, pattern) in patterns.iter().enumerate() {
            if !(pattern.starts_with('/') || pattern.starts_with("**")) {
                errors.push(DenyRulesError {
                    index,
                    pattern: pattern.clone(),
                    reason: "it must start with `/` (anchored at the root) or `**` (anywhere)"
                        .into(),
                });
                continue;
            }
            let mut variants = vec![pattern.as_str()];
            let dir = pattern.strip_suffix("/**");
            if let Some(dir) = dir.filter(|d| !d.is_empty()) {
                variants.push(dir);
            }
            for variant in variants {
                match GlobBuilder::new(variant)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                {
                    Ok(glob) => {
                        builder.add(glob);
                    }
                    Err(e) => {
                        errors.push(DenyRulesError {
                            index,
                            pattern: pattern.clone(),
                            reason: e.kind().to_string(),
                        });
                        break;
                    }
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let set = builder.build().map_err(|e| {
            vec![DenyRulesError {
                index: 0,
                pattern: String::new(),
                reason: e.to_string(),
            }]
        })?;
        Ok(DenyRules {
            patterns: patterns.to_vec(),
            set,
        })
    }

    /// True when the (already normalized) path matches a deny pattern.
    pub fn is_denied(&self, path: &str) -> bool {
        !self.patterns.is_empty() && self.set.is_match(path)
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(p: &[&str]) -> DenyRules {
        DenyRules::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn librehealth_patterns() {
        let r = rules(&["/sites/*/documents/**", "/sql/**", "**/*.sql", "**/*.inc"]);
        assert!(r.is_denied("/sites/default/documents/x.pdf"));
        assert!(r.is_denied("/sites/default/documents/a/b/c"));
        assert!(r.is_denied("/sites/default/documents"));
        assert!(!r.is_denied("/sites/default/images/logo.png"));
        assert!(!r.is_denied("/sites/a/b/documents/x"));
        assert!(r.is_denied("/sql"));
        assert!(r.is_denied("/sql/database.sql"));
        assert!(r.is_denied("/x.sql"));
        assert!(r.is_denied("/library/deep/globals.inc"));
        assert!(!r.is_denied("/library/globals.inc.php"));
        assert!(!r.is_denied("/sqlite/x"));
        assert!(!r.is_denied("/interface/login/login.php"));
    }

    #[test]
    fn bad_pattern_is_reported_with_index() {
        let errs =
            DenyRules::new(&["/ok/**".into(), "/bad/[".into(), "relative".into()]).unwrap_err();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].index, 1);
        assert_eq!(errs[1].index, 2);
    }
}
