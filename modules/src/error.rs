//! Problems found while validating a manifest. Each [`Issue`] names the field, says what is
//! wrong and how to fix it; a [`ManifestError`] adds where the manifest came from.
use std::fmt;

/// One problem in one field of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Dotted path of the field, e.g. `instances[1].addr`.
    pub field: String,
    /// What is wrong with the value.
    pub problem: String,
    /// What to write instead.
    pub fix: String,
}

impl Issue {
    pub fn new(
        field: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Issue {
            field: field.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// The same issue with its field placed under `parent` (e.g. `module[2]`).
    pub fn under(mut self, parent: &str) -> Self {
        if !parent.is_empty() {
            self.field = if self.field.is_empty() {
                parent.to_string()
            } else {
                format!("{parent}.{}", self.field)
            };
        }
        self
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.problem)?;
        } else {
            write!(f, "{}: {}", self.field, self.problem)?;
        }
        if !self.fix.is_empty() {
            write!(f, " (fix: {})", self.fix)?;
        }
        Ok(())
    }
}

/// Every problem found in one manifest source (a file path or an etcd key).
#[derive(Debug, Clone, thiserror::Error)]
pub struct ManifestError {
    /// Where the manifest came from: a file path or an etcd key.
    pub source_name: String,
    pub issues: Vec<Issue>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {issue}", self.source_name)?;
        }
        Ok(())
    }
}
