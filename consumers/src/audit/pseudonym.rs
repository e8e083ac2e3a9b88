//! Keyed pseudonyms for personal identifiers (pure).
//!
//! Guarantee: a pseudonym is the lowercase hex of HMAC-SHA256(key, UTF-8 bytes of the
//! value) under a secret key of at least 32 bytes with a version number; the same value
//! under the same key version always gives the same 64-character pseudonym (so grants
//! and per-actor rules still join), and nobody without the key can test a guess (a plain
//! hash of an email or user id is not a pseudonym: it falls to a dictionary attack).

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Minimum key length in bytes (the HMAC-SHA256 output size).
pub const MIN_KEY_LEN: usize = 32;

/// Why a pseudonym key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PseudonymKeyError {
    #[error("pseudonym key is {0} bytes; at least 32 are required")]
    TooShort(usize),
    #[error("pseudonym key is not standard base64: {0}")]
    Base64(String),
}

/// A versioned secret key for HMAC-SHA256 pseudonyms. Its `Debug` output hides the key.
#[derive(Clone)]
pub struct PseudonymKey {
    version: u32,
    /// HMAC state with the key already absorbed: cloned per pseudonym.
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PseudonymKey")
            .field("version", &self.version)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl PseudonymKey {
    /// A key from raw bytes (at least [`MIN_KEY_LEN`]).
    pub fn new(version: u32, key: &[u8]) -> Result<Self, PseudonymKeyError> {
        if key.len() < MIN_KEY_LEN {
            return Err(PseudonymKeyError::TooShort(key.len()));
        }
        let mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
        Ok(Self { version, mac })
    }

    /// A key from its standard base64 form (as kept in the config or a secret store).
    pub fn from_base64(version: u32, key: &str) -> Result<Self, PseudonymKeyError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|e| PseudonymKeyError::Base64(e.to_string()))?;
        Self::new(version, &bytes)
    }

    /// The key version, stored beside every pseudonym it made.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The pseudonym of `value`: 64 lowercase hex digits of HMAC-SHA256(key, value).
    pub fn pseudonym(&self, value: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(value.as_bytes());
        to_hex(&mac.finalize().into_bytes())
    }
}

/// Lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_short_keys_and_matches_an_independent_hmac() {
        // A 4-byte key (RFC 4231 test case 2) is refused; the value below was computed
        // with python3: hmac.new(b"k" * 32, b"alice", hashlib.sha256).hexdigest().
        assert_eq!(
            PseudonymKey::new(1, b"Jefe").unwrap_err(),
            PseudonymKeyError::TooShort(4)
        );
        let key = PseudonymKey::new(7, &[b'k'; 32]).unwrap();
        assert_eq!(key.version(), 7);
        assert_eq!(
            key.pseudonym("alice"),
            "6664a42048c6d6d7fe3657e39b14155c099246385212db085614c81f5b9c938d"
        );
    }

    #[test]
    fn deterministic_keyed_and_hidden() {
        let k1 = PseudonymKey::new(1, &[1u8; 32]).unwrap();
        let k2 = PseudonymKey::new(2, &[2u8; 32]).unwrap();
        assert_eq!(k1.pseudonym("u-1"), k1.pseudonym("u-1"));
        assert_ne!(k1.pseudonym("u-1"), k1.pseudonym("u-2"));
        assert_ne!(k1.pseudonym("u-1"), k2.pseudonym("u-1"));
        assert_eq!(k1.pseudonym("").len(), 64);
        assert!(!format!("{k1:?}").contains("1, 1"));
        let b64 = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        let k3 = PseudonymKey::from_base64(1, &b64).unwrap();
        assert_eq!(k3.pseudonym("u-1"), k1.pseudonym("u-1"));
        assert!(PseudonymKey::from_base64(1, "not base64!").is_err());
    }
}
