//! Human-written durations (`"600s"`, `"1h 30m"`) and sizes (`"32MiB"`, `"350 MB"`).
use std::time::Duration;

/// Parses a duration such as `5s`, `250ms`, `10m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("`{text}` is not a duration ({e})"))
}

/// Parses a size such as `32MiB`, `350 MB`, `64KiB` or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if let Ok(n) = trimmed.parse::<u64>() {
        return Ok(n);
    }
    trimmed
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("`{text}` is not a size ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32MiB").unwrap(), 32 * 1024 * 1024);
        assert_eq!(parse_size("32 MiB").unwrap(), 32 * 1024 * 1024);
        assert_eq!(parse_size("350MB").unwrap(), 350_000_000);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("600s").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("10 parsecs").is_err());
    }
}
