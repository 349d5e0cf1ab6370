//! Session affinity tokens: the opaque value of SPACE's routing cookie.
//!
//! A token is `HMAC-SHA256(key, module NUL instance-id)` cut to 128 bits, written in
//! base64url (22 characters): never an address, and only a holder of the key file can mint
//! one. Keys come from a file shared by all replicas (one key per line); the first key
//! signs, every key verifies, so keys rotate without logging anyone out. Tokens are
//! computed when a table is compiled, so the request path verifies a cookie with one hash
//! map lookup and no HMAC.
use std::{fmt, path::Path, sync::OnceLock};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use hmac::{Hmac, Mac};
use rustc_hash::FxHashMap;
use sha2::Sha256;
use space_modules::AffinitySpec;

type HmacSha256 = Hmac<Sha256>;

/// A routing token: 128 bits.
pub type Token = [u8; 16];

/// The affinity keys in use. `Debug` never prints them.
#[derive(Clone)]
pub struct AffinityKeys {
    /// One keyed HMAC state per key, cloned per token (saves re-keying each time).
    macs: Vec<HmacSha256>,
    /// Identifies this key set (a hash of the keys), for caches.
    fingerprint: u64,
    /// Where they came from: a file path, or `generated` (this process only).
    pub source: String,
}

impl fmt::Debug for AffinityKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AffinityKeys({} key(s) from {})",
            self.macs.len(),
            self.source
        )
    }
}

/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;

impl AffinityKeys {
    /// Reads a key file: one key per line (e.g. `openssl rand -hex 32`), `#` comments and
    /// blank lines ignored; the first key signs.
    pub fn load(path: &Path) -> Result<AffinityKeys, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let keys: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if keys.is_empty() {
            return Err(format!("{} holds no key", path.display()));
        }
        if let Some(i) = keys.iter().position(|k| k.len() < MIN_KEY_LEN) {
            return Err(format!(
                "key {} in {} is shorter than {MIN_KEY_LEN} characters",
                i + 1,
                path.display()
            ));
        }
        Ok(AffinityKeys::from_keys(keys, path.display().to_string()))
    }

    /// A random key for this process, the same for every reload. Replicas will not agree.
    pub fn generated() -> AffinityKeys {
        static KEY: OnceLock<Vec<u8>> = OnceLock::new();
        let key = KEY.get_or_init(|| rand::random::<[u8; 32]>().to_vec());
        AffinityKeys::from_keys(vec![key.clone()], "generated".into())
    }

    fn from_keys(keys: Vec<Vec<u8>>, source: String) -> AffinityKeys {
        let macs = keys
            .iter()
            .map(|k| HmacSha256::new_from_slice(k).expect("HMAC accepts keys of any length"))
            .collect();
        let mut fp = HmacSha256::new_from_slice(b"space key set").expect("static key");
        for k in &keys {
            fp.update(&(k.len() as u64).to_le_bytes());
            fp.update(k);
        }
        let fingerprint =
            u64::from_le_bytes(fp.finalize().into_bytes()[..8].try_into().expect("8 bytes"));
        AffinityKeys {
            macs,
            fingerprint,
            source,
        }
    }

    /// Identifies this key set, e.g. to cache tokens computed with it.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    pub fn len(&self) -> usize {
        self.macs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.macs.is_empty()
    }

    fn mac(&self, key: usize) -> HmacSha256 {
        self.macs[key].clone()
    }

    /// The token for `instance` of `module` under key number `key`.
    pub fn token(&self, key: usize, module: &str, instance: &str) -> Token {
        let mut mac = self.mac(key);
        mac.update(module.as_bytes());
        mac.update(&[0]);
        mac.update(instance.as_bytes());
        let out = mac.finalize().into_bytes();
        let mut t = [0u8; 16];
        t.copy_from_slice(&out[..16]);
        t
    }

    /// A keyed hash of a session id, safe to log (12 hex digits); never the id itself.
    pub fn session_fingerprint(&self, session_id: &str) -> String {
        let mut mac = self.mac(0);
        mac.update(b"session\0");
        mac.update(session_id.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..6])
    }
}

/// Encodes a token as a cookie value.
pub fn encode_token(t: &Token) -> String {
    URL_SAFE_NO_PAD.encode(t)
}

/// Decodes a cookie value; `None` when it is not a well-formed token.
pub fn decode_token(value: &str) -> Option<Token> {
    if value.len() != 22 {
        return None;
    }
    let mut t = [0u8; 16];
    match URL_SAFE_NO_PAD.decode_slice(value.as_bytes(), &mut t) {
        Ok(16) => Some(t),
        _ => None,
    }
}

/// A module's affinity, compiled: which token names which instance.
#[derive(Debug)]
pub struct ModuleAffinity {
    pub spec: AffinitySpec,
    /// Token -> (instance index, signed with the current key). FxHash: the keys are HMAC
    /// outputs SPACE made, and clients can only look up, never insert.
    tokens: FxHashMap<Token, (u32, bool)>,
    /// The cookie value for each instance under the signing key.
    pub cookie_values: Vec<String>,
}

/// What a routing cookie says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieVerdict {
    /// Names instance `index`; `current_key` is false when signed by an older key.
    Instance { index: usize, current_key: bool },
    /// Well-formed but names no instance in this table (removed, or another key).
    Unknown,
    /// Not a token at all.
    Malformed,
}

impl ModuleAffinity {
    /// Computes every instance's tokens under every key; `cache(i, compute)` lets the caller
    /// keep them across table builds (they only change with the key set).
    pub fn compile(
        spec: &AffinitySpec,
        module: &str,
        instance_ids: &[&str],
        keys: &AffinityKeys,
        cache: impl Fn(usize, &dyn Fn() -> Vec<Token>) -> Vec<Token>,
    ) -> Self {
        let mut tokens = FxHashMap::with_capacity_and_hasher(
            instance_ids.len() * keys.len(),
            Default::default(),
        );
        let mut cookie_values = Vec::with_capacity(instance_ids.len());
        for (i, id) in instance_ids.iter().enumerate() {
            let compute = || {
                (0..keys.len())
                    .map(|k| keys.token(k, module, id))
                    .collect::<Vec<Token>>()
            };
            let per_key = cache(i, &compute);
            for (k, t) in per_key.iter().enumerate().rev() {
                tokens.insert(*t, (i as u32, k == 0));
            }
            cookie_values.push(encode_token(&per_key[0]));
        }
        ModuleAffinity {
            spec: spec.clone(),
            tokens,
            cookie_values,
        }
    }

    /// Reads a routing cookie value.
    pub fn verify(&self, value: &str) -> CookieVerdict {
        match decode_token(value) {
            None => CookieVerdict::Malformed,
            Some(t) => match self.tokens.get(&t) {
                Some(&(index, current_key)) => CookieVerdict::Instance {
                    index: index as usize,
                    current_key,
                },
                None => CookieVerdict::Unknown,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(lines: &str) -> AffinityKeys {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, lines).unwrap();
        AffinityKeys::load(&p).unwrap()
    }

    fn spec() -> AffinitySpec {
        AffinitySpec {
            cookie: "space-core".into(),
            max_age: None,
            drain_timeout: std::time::Duration::from_secs(3600),
            secure_session_cookies: false,
            session_cookie_samesite: None,
        }
    }

    #[test]
    fn tokens_verify_under_every_key_and_sign_with_the_first() {
        let old = keys("# old\nold-key-0123456789abcdef\n");
        let rotated = keys("new-key-0123456789abcdef\nold-key-0123456789abcdef\n");
        let ids = ["core-1", "core-2"];
        let before = ModuleAffinity::compile(&spec(), "core", &ids, &old, |_, f| f());
        let after = ModuleAffinity::compile(&spec(), "core", &ids, &rotated, |_, f| f());
        // A cookie minted before the rotation still pins, flagged for re-signing.
        assert_eq!(
            after.verify(&before.cookie_values[1]),
            CookieVerdict::Instance {
                index: 1,
                current_key: false
            }
        );
        assert_eq!(
            after.verify(&after.cookie_values[0]),
            CookieVerdict::Instance {
                index: 0,
                current_key: true
            }
        );
        assert_ne!(before.cookie_values[0], after.cookie_values[0]);
    }

    #[test]
    fn forged_and_malformed_values_are_not_trusted() {
        let k = keys("key-0123456789abcdef\n");
        let a = ModuleAffinity::compile(&spec(), "core", &["core-1"], &k, |_, f| f());
        assert_eq!(a.verify("AAAAAAAAAAAAAAAAAAAAAA"), CookieVerdict::Unknown);
        assert_eq!(a.verify("127.0.0.1:80"), CookieVerdict::Malformed);
        assert_eq!(a.verify(""), CookieVerdict::Malformed);
        // The same instance id in another module is another token.
        let other = ModuleAffinity::compile(&spec(), "portal", &["core-1"], &k, |_, f| f());
        assert_eq!(a.verify(&other.cookie_values[0]), CookieVerdict::Unknown);
    }

    #[test]
    fn short_or_missing_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "short\n").unwrap();
        assert!(AffinityKeys::load(&p).unwrap_err().contains("shorter"));
        std::fs::write(&p, "# nothing\n").unwrap();
        assert!(AffinityKeys::load(&p).unwrap_err().contains("no key"));
        assert!(format!("{:?}", keys("secret-0123456789abcdef"))
            .find("secret")
            .is_none());
    }
}
