//! The heartbeat key the controller pushes (`PUT /v1/heartbeat-key`): the
//! request body, which is also what `heartbeat-key.json` in the state
//! directory holds, and the bootstrap key file.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::heartbeat::{SigningKey, BOOTSTRAP_KEY_ID};

/// Bytes in a pushed key.
pub const KEY_LEN: usize = 32;
/// The shortest bootstrap key accepted.
pub const MIN_BOOTSTRAP_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("key_id must be at least 1 (0 is the bootstrap key)")]
    BootstrapId,
    #[error("key must be {} hex characters ({KEY_LEN} bytes)", KEY_LEN * 2)]
    NotHex,
    #[error("{path}: {problem}")]
    Bootstrap { path: String, problem: String },
}

/// `{"key_id": N, "key": "<64 hex>"}`, N at least 1.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "Wire", into = "Wire")]
pub struct PushedKey {
    pub key_id: u32,
    secret: [u8; KEY_LEN],
}

impl std::fmt::Debug for PushedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushedKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    key_id: u32,
    key: String,
}

impl TryFrom<Wire> for PushedKey {
    type Error = KeyError;

    fn try_from(w: Wire) -> Result<PushedKey, KeyError> {
        if w.key_id == BOOTSTRAP_KEY_ID {
            return Err(KeyError::BootstrapId);
        }
        Ok(PushedKey {
            key_id: w.key_id,
            secret: from_hex(&w.key).ok_or(KeyError::NotHex)?,
        })
    }
}

impl From<PushedKey> for Wire {
    fn from(k: PushedKey) -> Wire {
        Wire {
            key_id: k.key_id,
            key: k.secret.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

impl PushedKey {
    /// A key as the controller makes it (`key_id` at least 1).
    pub fn new(key_id: u32, secret: [u8; KEY_LEN]) -> Result<PushedKey, KeyError> {
        if key_id == BOOTSTRAP_KEY_ID {
            return Err(KeyError::BootstrapId);
        }
        Ok(PushedKey { key_id, secret })
    }

    /// The HMAC secret.
    pub fn secret(&self) -> &[u8; KEY_LEN] {
        &self.secret
    }

    pub fn signing_key(&self) -> SigningKey {
        SigningKey::new(self.key_id, &self.secret)
    }
}

fn from_hex(text: &str) -> Option<[u8; KEY_LEN]> {
    let digits = text.as_bytes();
    if digits.len() != KEY_LEN * 2 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; KEY_LEN];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// The bootstrap key (key id 0) from its file: surrounding whitespace
/// ignored, at least [`MIN_BOOTSTRAP_LEN`] bytes.
pub fn bootstrap(path: &Path) -> Result<SigningKey, KeyError> {
    let bad = |problem: String| KeyError::Bootstrap {
        path: path.display().to_string(),
        problem,
    };
    let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let secret = text.trim_ascii();
    if secret.len() < MIN_BOOTSTRAP_LEN {
        return Err(bad(format!("shorter than {MIN_BOOTSTRAP_LEN} bytes")));
    }
    Ok(SigningKey::new(BOOTSTRAP_KEY_ID, secret))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail by panicking
    use super::*;

    #[test]
    fn pushed_keys_parse_strictly_and_round_trip() {
        let hex = "00112233445566778899aabbccddeeffFFEEDDCCBBAA99887766554433221100";
        let k: PushedKey =
            serde_json::from_str(&format!(r#"{{"key_id": 3, "key": "{hex}"}}"#)).unwrap();
        assert_eq!(k.key_id, 3);
        assert_eq!(k.secret[0], 0x00);
        assert_eq!(k.secret[1], 0x11);
        assert_eq!(k.secret[16], 0xff);
        let back: PushedKey = serde_json::from_str(&serde_json::to_string(&k).unwrap()).unwrap();
        assert_eq!(back, k);
        assert!(!format!("{k:?}").contains("11"), "{k:?}");
        for bad in [
            format!(r#"{{"key_id": 0, "key": "{hex}"}}"#),
            format!(r#"{{"key_id": -1, "key": "{hex}"}}"#),
            format!(r#"{{"key_id": 4294967296, "key": "{hex}"}}"#),
            format!(r#"{{"key_id": 1, "key": "{}"}}"#, &hex[2..]),
            format!(r#"{{"key_id": 1, "key": "{hex}00"}}"#),
            format!(r#"{{"key_id": 1, "key": "{}zz"}}"#, &hex[2..]),
            format!(r#"{{"key_id": 1, "key": "+{}"}}"#, &hex[1..]),
            format!(r#"{{"key_id": 1, "key": "{hex}", "extra": 1}}"#),
            format!(r#"{{"key": "{hex}"}}"#),
            r#"{"key_id": 1}"#.to_owned(),
            "[]".to_owned(),
        ] {
            assert!(serde_json::from_str::<PushedKey>(&bad).is_err(), "{bad}");
        }
        // Multi-byte characters are not hex digits (and not split).
        let wide = format!(r#"{{"key_id": 1, "key": "é{}"}}"#, &hex[2..]);
        assert!(serde_json::from_str::<PushedKey>(&wide).is_err());
    }
}
