//! AES-256-GCM sealing of batches under the protected item's data key.
//!
//! The associated data binds a sealed batch to (protocol version, item, disk, disk size, first and last
//! sequence), all sent in clear beside the ciphertext. Flipping a bit anywhere, truncating the ciphertext,
//! or presenting a batch under another item, disk or sequence range fails authentication. Replay and
//! reordering of authentic batches are caught by the master target, which applies only the next
//! sequence number of each disk.
//!
//! Nonces are 96 random bits from the OS for each seal. With at most 2^32 seals per key (NIST SP 800-38D
//! section 8.3) the chance of a repeat stays below 2^-32; a key seals one batch of up to several MiB per
//! call, so an item reaches that bound only after petabytes.

use crate::types::{DiskId, ItemId, Seq};
use crate::wire::{SealedBatch, PROTOCOL_VERSION};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("authentication failed for item {item} disk {disk} seq {first}..={last}: the batch was altered, truncated or sealed under another key")]
    Auth { item: ItemId, disk: DiskId, first: Seq, last: Seq },
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
}

/// The data key of one protected item.
#[derive(Clone)]
pub struct ItemKey {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for ItemKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ItemKey(..)")
    }
}

impl ItemKey {
    pub fn from_bytes(key: &[u8; 32]) -> Self {
        ItemKey { cipher: Aes256Gcm::new(key.into()) }
    }

    pub fn generate() -> ([u8; 32], Self) {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        (k, Self::from_bytes(&k))
    }

    /// Reads a key file holding 64 hex digits.
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let err = |reason: String| SealError::KeyFile { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let bytes = hex::decode(text.trim()).map_err(|e| err(format!("not hex: {e}")))?;
        let key: [u8; 32] =
            bytes.try_into().map_err(|b: Vec<u8>| err(format!("{} bytes, an AES-256 key is 32", b.len())))?;
        Ok(Self::from_bytes(&key))
    }

    pub fn seal(
        &self,
        item: ItemId,
        disk: DiskId,
        disk_size: u64,
        first: Seq,
        last: Seq,
        payload: &[u8],
    ) -> SealedBatch {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = aad(item, disk, disk_size, first, last);
        let ciphertext = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: payload, aad: &aad })
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        SealedBatch { item, disk, disk_size, first, last, nonce, ciphertext }
    }

    pub fn open(&self, b: &SealedBatch) -> Result<Vec<u8>, SealError> {
        let aad = aad(b.item, b.disk, b.disk_size, b.first, b.last);
        self.cipher
            .decrypt(Nonce::from_slice(&b.nonce), Payload { msg: &b.ciphertext, aad: &aad })
            .map_err(|_| SealError::Auth { item: b.item, disk: b.disk, first: b.first, last: b.last })
    }
}

fn aad(item: ItemId, disk: DiskId, disk_size: u64, first: Seq, last: Seq) -> [u8; 44] {
    let mut a = [0u8; 44];
    a[0..4].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    a[4..12].copy_from_slice(&item.0.to_le_bytes());
    a[12..20].copy_from_slice(&disk.0.to_le_bytes());
    a[20..28].copy_from_slice(&disk_size.to_le_bytes());
    a[28..36].copy_from_slice(&first.0.to_le_bytes());
    a[36..44].copy_from_slice(&last.0.to_le_bytes());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed() -> (ItemKey, SealedBatch) {
        let (_, key) = ItemKey::generate();
        let s = key.seal(ItemId(1), DiskId(2), 1 << 20, Seq(3), Seq(9), b"payload bytes");
        (key, s)
    }

    #[test]
    fn round_trip() {
        let (key, s) = sealed();
        assert_eq!(key.open(&s).unwrap(), b"payload bytes");
    }

    #[test]
    fn nonces_differ() {
        let (key, s) = sealed();
        let t = key.seal(ItemId(1), DiskId(2), 1 << 20, Seq(3), Seq(9), b"payload bytes");
        assert_ne!(s.nonce, t.nonce);
        assert_ne!(s.ciphertext, t.ciphertext);
    }

    #[test]
    fn tampering_is_rejected() {
        let (key, s) = sealed();
        for i in 0..s.ciphertext.len() {
            let mut t = s.clone();
            t.ciphertext[i] ^= 0x40;
            assert!(key.open(&t).is_err());
        }
        let mut t = s.clone();
        t.ciphertext.truncate(t.ciphertext.len() - 1);
        assert!(key.open(&t).is_err());
        let mut t = s.clone();
        t.first = Seq(4);
        assert!(key.open(&t).is_err(), "moving a batch to other sequence numbers is detected");
        let mut t = s.clone();
        t.disk = DiskId(3);
        assert!(key.open(&t).is_err());
        let mut t = s.clone();
        t.nonce[0] ^= 1;
        assert!(key.open(&t).is_err());
        let (_, other) = ItemKey::generate();
        assert!(other.open(&s).is_err(), "another item's key cannot open it");
    }
}

/// One `[[item]]` entry of a service config: the item and the file holding its data key.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ItemKeyConfig {
    pub id: u64,
    pub key_file: std::path::PathBuf,
}

/// The data keys a service holds, by item.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: std::collections::HashMap<ItemId, ItemKey>,
}

impl KeyRing {
    pub fn load(items: &[ItemKeyConfig]) -> Result<KeyRing, SealError> {
        let mut keys = std::collections::HashMap::new();
        for i in items {
            keys.insert(ItemId(i.id), ItemKey::load(&i.key_file)?);
        }
        Ok(KeyRing { keys })
    }
    pub fn from_keys(keys: impl IntoIterator<Item = (ItemId, ItemKey)>) -> KeyRing {
        KeyRing { keys: keys.into_iter().collect() }
    }

    pub fn get(&self, item: ItemId) -> Option<&ItemKey> {
        self.keys.get(&item)
    }
}
