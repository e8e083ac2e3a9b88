//! C2SP signed notes (c2sp.org/signed-note) with Ed25519 keys (pure).
//!
//! Guarantee: [`open`] returns a note's text only if it is well formed (UTF-8, no control
//! characters but newline, text ending in a newline, a blank line, then 1..=100 signature
//! lines `— <name> <base64(key id || signature)>`) and at least one signature by a known
//! key (same name AND key id) verifies; any known key's signature that fails to verify,
//! or appears twice, rejects the whole note; signatures by unknown keys are ignored.
//! Key id = SHA-256(name || 0x0A || 0x01 || 32-byte public key)[:4], big-endian.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Signature type byte of Ed25519 note signatures.
pub const ALG_ED25519: u8 = 0x01;
/// Most signature lines a note may carry (the spec asks verifiers to accept 16).
pub const MAX_SIGNATURES: usize = 100;
/// The em dash and space that open a signature line.
const SIG_PREFIX: &str = "\u{2014} ";

/// Why a note, a key or a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    #[error("malformed key: {0}")]
    MalformedKey(&'static str),
    #[error("no signature by a known key")]
    NoKnownSignature,
    #[error("invalid signature by known key {0}")]
    BadSignature(String),
    #[error("key {0} signed the note twice")]
    DuplicateSignature(String),
}

/// Key id of a key: SHA-256(name || 0x0A || alg || public key)[:4] as a big-endian u32.
pub fn key_id(name: &str, alg: u8, public_key: &[u8]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', alg]);
    h.update(public_key);
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// Key names are non-empty and contain neither Unicode spaces nor `+` (nor controls).
pub fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c.is_control())
}

/// An Ed25519 signing key with its note name. `Debug` hides the private key.
#[derive(Clone)]
pub struct NoteSigner {
    name: String,
    id: u32,
    key: SigningKey,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NoteSigner({}+{:08x})", self.name, self.id)
    }
}

impl NoteSigner {
    /// A signer from a key name and a 32-byte Ed25519 private key seed.
    pub fn new(name: &str, seed: &[u8; 32]) -> Result<Self, NoteError> {
        if !valid_key_name(name) {
            return Err(NoteError::MalformedKey(
                "key name is empty or has a space or '+'",
            ));
        }
        let key = SigningKey::from_bytes(seed);
        let id = key_id(name, ALG_ED25519, key.verifying_key().as_bytes());
        Ok(Self {
            name: name.to_string(),
            id,
            key,
        })
    }

    /// Parse `PRIVATE+KEY+<name>+<8 hex id>+<base64(0x01 || 32-byte seed)>` (the private
    /// key string of Go's `golang.org/x/mod/sumdb/note`); the id must match the key.
    pub fn from_key_string(s: &str) -> Result<Self, NoteError> {
        let rest = s
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(NoteError::MalformedKey("missing PRIVATE+KEY+ prefix"))?;
        let (name, id, key) = split_key(rest)?;
        let seed: [u8; 32] = key
            .try_into()
            .map_err(|_| NoteError::MalformedKey("Ed25519 private key is not 32 bytes"))?;
        let signer = Self::new(name, &seed)?;
        if signer.id != id {
            return Err(NoteError::MalformedKey("key id does not match the key"));
        }
        Ok(signer)
    }

    /// The private key string [`NoteSigner::from_key_string`] reads. Keep it secret.
    pub fn to_key_string(&self) -> String {
        let mut key = vec![ALG_ED25519];
        key.extend_from_slice(&self.key.to_bytes());
        format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name,
            self.id,
            B64.encode(key)
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key_id(&self) -> u32 {
        self.id
    }

    /// The matching public key.
    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            id: self.id,
            key: self.key.verifying_key(),
        }
    }

    /// The signature line (with its newline) for `text`.
    pub fn signature_line(&self, text: &str) -> String {
        let sig = self.key.sign(text.as_bytes());
        let mut raw = self.id.to_be_bytes().to_vec();
        raw.extend_from_slice(&sig.to_bytes());
        format!("{SIG_PREFIX}{} {}\n", self.name, B64.encode(raw))
    }
}

/// An Ed25519 public key with its note name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl NoteVerifier {
    /// Parse a verifier key `<name>+<8 hex id>+<base64(0x01 || 32-byte public key)>`;
    /// the id must be the key's id.
    pub fn parse(s: &str) -> Result<Self, NoteError> {
        let (name, id, key) = split_key(s.trim())?;
        let key: [u8; 32] = key
            .try_into()
            .map_err(|_| NoteError::MalformedKey("Ed25519 public key is not 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&key)
            .map_err(|_| NoteError::MalformedKey("not an Ed25519 public key"))?;
        if key_id(name, ALG_ED25519, key.as_bytes()) != id {
            return Err(NoteError::MalformedKey("key id does not match the key"));
        }
        Ok(Self {
            name: name.to_string(),
            id,
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key_id(&self) -> u32 {
        self.id
    }

    fn verify(&self, text: &[u8], sig: &[u8]) -> bool {
        match Signature::from_slice(sig) {
            Ok(sig) => self.key.verify_strict(text, &sig).is_ok(),
            Err(_) => false,
        }
    }
}

impl std::fmt::Display for NoteVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut key = vec![ALG_ED25519];
        key.extend_from_slice(self.key.as_bytes());
        write!(f, "{}+{:08x}+{}", self.name, self.id, B64.encode(key))
    }
}

/// Split `<name>+<8 hex>+<base64(alg || key)>` into (name, id, key bytes after alg).
fn split_key(s: &str) -> Result<(&str, u32, Vec<u8>), NoteError> {
    // The base64 key may itself contain '+': split at the first two only.
    let mut parts = s.splitn(3, '+');
    let (Some(name), Some(hex), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(NoteError::MalformedKey("expected name+hexid+base64"));
    };
    if !valid_key_name(name) {
        return Err(NoteError::MalformedKey("key name is empty or has a space"));
    }
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(NoteError::MalformedKey("key id is not 8 hex digits"));
    }
    let id = u32::from_str_radix(hex, 16).map_err(|_| NoteError::MalformedKey("key id"))?;
    let raw = B64
        .decode(b64)
        .map_err(|_| NoteError::MalformedKey("key is not standard base64"))?;
    match raw.split_first() {
        Some((&ALG_ED25519, key)) => Ok((name, id, key.to_vec())),
        Some(_) => Err(NoteError::MalformedKey("unsupported signature type")),
        None => Err(NoteError::MalformedKey("empty key")),
    }
}

/// One signature line of a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteSignature {
    pub name: String,
    pub key_id: u32,
    /// The signature bytes after the key id.
    pub signature: Vec<u8>,
}

/// A syntactically valid note whose signatures are not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The signed text, including its final newline.
    pub text: String,
    pub signatures: Vec<NoteSignature>,
}

/// A text is signable when it is non-empty, ends in a newline and has no control
/// characters other than newline.
fn check_text(text: &str) -> Result<(), NoteError> {
    if !text.ends_with('\n') {
        return Err(NoteError::Malformed("text does not end with a newline"));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && (c as u32) < 0x20)
    {
        return Err(NoteError::Malformed("control character in note"));
    }
    Ok(())
}

impl Note {
    /// Parse a signed note without verifying it.
    pub fn parse(msg: &[u8]) -> Result<Self, NoteError> {
        let msg = std::str::from_utf8(msg).map_err(|_| NoteError::Malformed("not UTF-8"))?;
        if msg.chars().any(|c| (c as u32) < 0x20 && c != '\n') {
            return Err(NoteError::Malformed("control character in note"));
        }
        let split = msg
            .rfind("\n\n")
            .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
        let (text, sigs) = (&msg[..split + 1], &msg[split + 2..]);
        let lines = sigs
            .strip_suffix('\n')
            .ok_or(NoteError::Malformed("signatures do not end with a newline"))?;
        let mut signatures = Vec::new();
        for line in lines.split('\n') {
            if signatures.len() == MAX_SIGNATURES {
                return Err(NoteError::Malformed("too many signatures"));
            }
            signatures.push(parse_signature_line(line)?);
        }
        Ok(Self {
            text: text.to_string(),
            signatures,
        })
    }

    /// The note as text: body, blank line, one line per signature.
    pub fn serialize(&self) -> String {
        let mut out = self.text.clone();
        out.push('\n');
        for s in &self.signatures {
            let mut raw = s.key_id.to_be_bytes().to_vec();
            raw.extend_from_slice(&s.signature);
            out.push_str(&format!("{SIG_PREFIX}{} {}\n", s.name, B64.encode(raw)));
        }
        out
    }

    /// Check the signatures against `known` keys; returns the keys that verified.
    pub fn verify<'k>(
        &self,
        known: &'k [NoteVerifier],
    ) -> Result<Vec<&'k NoteVerifier>, NoteError> {
        let mut verified: Vec<&NoteVerifier> = Vec::new();
        for sig in &self.signatures {
            let Some(key) = known
                .iter()
                .find(|k| k.name == sig.name && k.id == sig.key_id)
            else {
                continue; // unknown key: ignored
            };
            if verified.iter().any(|v| std::ptr::eq(*v, key)) {
                return Err(NoteError::DuplicateSignature(key.to_string()));
            }
            if !key.verify(self.text.as_bytes(), &sig.signature) {
                return Err(NoteError::BadSignature(key.to_string()));
            }
            verified.push(key);
        }
        if verified.is_empty() {
            return Err(NoteError::NoKnownSignature);
        }
        Ok(verified)
    }
}

fn parse_signature_line(line: &str) -> Result<NoteSignature, NoteError> {
    let rest = line.strip_prefix(SIG_PREFIX).ok_or(NoteError::Malformed(
        "signature line does not start with an em dash",
    ))?;
    let (name, b64) = rest
        .split_once(' ')
        .ok_or(NoteError::Malformed("signature line has no key name"))?;
    if !valid_key_name(name) {
        return Err(NoteError::Malformed("bad key name in signature line"));
    }
    let raw = B64
        .decode(b64)
        .map_err(|_| NoteError::Malformed("signature is not standard base64"))?;
    if raw.len() < 5 {
        return Err(NoteError::Malformed("signature is shorter than 5 bytes"));
    }
    Ok(NoteSignature {
        name: name.to_string(),
        key_id: u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]),
        signature: raw[4..].to_vec(),
    })
}

/// Sign `text` (which must end in a newline) with every signer: the signed note.
pub fn sign(text: &str, signers: &[&NoteSigner]) -> Result<String, NoteError> {
    check_text(text)?;
    if signers.is_empty() {
        return Err(NoteError::Malformed("no signer"));
    }
    let mut out = format!("{text}\n");
    for s in signers {
        out.push_str(&s.signature_line(text));
    }
    Ok(out)
}

/// Parse and verify a signed note against the known keys; the verified note.
pub fn open(msg: &[u8], known: &[NoteVerifier]) -> Result<Note, NoteError> {
    let note = Note::parse(msg)?;
    note.verify(known)?;
    Ok(note)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn signer(name: &str, seed: u8) -> NoteSigner {
        NoteSigner::new(name, &[seed; 32]).unwrap()
    }

    /// The example key and note of Go's golang.org/x/mod/sumdb/note documentation
    /// (an independent implementation of the same format).
    const GO_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const GO_SKEY: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const GO_NOTE: &str = "If you think cryptography is the answer to your problem,\n\
then you don't know what your problem is.\n\
\n\
\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    #[test]
    fn interoperates_with_go_sumdb_note() {
        let v = NoteVerifier::parse(GO_VKEY).unwrap();
        assert_eq!(v.to_string(), GO_VKEY);
        let note = open(GO_NOTE.as_bytes(), std::slice::from_ref(&v)).unwrap();
        assert!(note.text.starts_with("If you think"));
        let s = NoteSigner::from_key_string(GO_SKEY).unwrap();
        assert_eq!(s.verifier(), v);
        assert_eq!(s.to_key_string(), GO_SKEY);
        // Ed25519 is deterministic: we produce Go's signature byte for byte.
        assert_eq!(sign(&note.text, &[&s]).unwrap(), GO_NOTE);
        assert_eq!(
            Note::parse(GO_NOTE.as_bytes()).unwrap().serialize(),
            GO_NOTE
        );
    }

    #[test]
    fn key_strings_round_trip_and_bad_ones_are_refused() {
        let s = signer("tally.example/audit", 9);
        let v = s.verifier();
        assert_eq!(NoteVerifier::parse(&v.to_string()).unwrap(), v);
        assert_eq!(
            NoteSigner::from_key_string(&s.to_key_string())
                .unwrap()
                .verifier(),
            v
        );
        let text = v.to_string();
        let wrong_id = text.replacen(&format!("{:08x}", v.key_id()), "00000000", 1);
        for bad in [
            "",
            "name+0000000+AQ==",
            "a b+00000000+AQ==",
            "name+zzzzzzzz+AQ==",
            wrong_id.as_str(),
            "name+00000000+AgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "name+00000000",
        ] {
            assert!(NoteVerifier::parse(bad).is_err(), "{bad}");
        }
        assert!(NoteSigner::new("has+plus", &[1; 32]).is_err());
        assert!(NoteSigner::new("", &[1; 32]).is_err());
    }

    #[test]
    fn unknown_keys_are_ignored_known_bad_signatures_reject() {
        let log = signer("log.example", 1);
        let witness = signer("witness.example", 2);
        let text = "hello\n\nworld\n";
        let both = sign(text, &[&log, &witness]).unwrap();
        // Known log key, unknown witness: accepted.
        let n = open(both.as_bytes(), &[log.verifier()]).unwrap();
        assert_eq!(n.text, text);
        assert_eq!(n.signatures.len(), 2);
        // Only unknown keys: rejected.
        let other = signer("log.example", 3); // same name, other key and id
        assert_eq!(
            open(both.as_bytes(), &[other.verifier()]),
            Err(NoteError::NoKnownSignature)
        );
        // A known key's signature over other text: rejected.
        let forged = both.replacen("world", "w0rld", 1);
        assert!(matches!(
            open(forged.as_bytes(), &[log.verifier()]),
            Err(NoteError::BadSignature(_))
        ));
        // The same known signature twice: rejected.
        let line = log.signature_line(text);
        let twice = format!("{text}\n{line}{line}");
        assert!(matches!(
            open(twice.as_bytes(), &[log.verifier()]),
            Err(NoteError::DuplicateSignature(_))
        ));
    }

    #[test]
    fn malformed_notes_are_rejected() {
        let log = signer("log.example", 1);
        let good = sign("a\nb\n", &[&log]).unwrap();
        let known = [log.verifier()];
        assert!(open(good.as_bytes(), &known).is_ok());
        let sig_line = good.split('\n').nth(3).unwrap().to_string();
        let cases: Vec<(String, &str)> = vec![
            (good.trim_end().to_string(), "no final newline"),
            (good.replacen("\n\n", "\n", 1), "no blank line"),
            (format!("a\nb\n\n{sig_line}\n\n"), "empty signature line"),
            (
                format!("a\nb\n\n{}\n", sig_line.replacen('\u{2014}', "-", 1)),
                "hyphen not em dash",
            ),
            (
                format!("a\nb\n\n{}\n", sig_line.replacen(' ', "  ", 1)),
                "double space",
            ),
            (format!("a\nb\n\n{sig_line}=\n"), "bad base64"),
            (format!("a\r\nb\n\n{sig_line}\n"), "carriage return"),
            (
                "a\nb\n\n\u{2014} log.example AAAA\n".to_string(),
                "short signature",
            ),
            ("a\nb\n\n".to_string(), "no signatures"),
        ];
        for (msg, why) in cases {
            assert!(open(msg.as_bytes(), &known).is_err(), "{why}: {msg:?}");
        }
        assert!(open(&[0xff, b'\n', b'\n'], &known).is_err());
        let many = format!(
            "a\nb\n\n{}",
            format!("{sig_line}\n").repeat(MAX_SIGNATURES + 1)
        );
        assert_eq!(
            Note::parse(many.as_bytes()),
            Err(NoteError::Malformed("too many signatures"))
        );
        assert!(sign("no newline", &[&log]).is_err());
        assert!(sign("tab\there\n", &[&log]).is_err());
    }
}
