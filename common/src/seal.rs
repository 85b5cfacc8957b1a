//! AES-256-GCM sealing of batches under the protected item's data key.
//!
//! The associated data binds a sealed batch to (seal format, item, disk, disk size, first and last
//! sequence), all sent in clear beside the ciphertext. Flipping a bit anywhere, truncating the ciphertext,
//! or presenting a batch under another item, disk or sequence range fails authentication. Replay and
//! reordering of authentic batches are caught by the master target, which applies only the next
//! sequence number of each disk.
//!
//! Nonces are 96 random bits from the OS for each seal, so a key must seal far fewer than 2^32 batches
//! (NIST SP 800-38D section 8.3). An item's data key therefore has epochs: [`ItemKeys`] seals under
//! the newest, counts its seals and refuses past [`SEAL_LIMIT`]; the configuration server rotates an
//! item's key (a new epoch) long before, by age or by the seal counts the process servers report, while
//! replication runs. The epoch is sent beside the ciphertext and bound into the associated data; a
//! master target opens a batch with the key of its epoch.
//!
//! The cipher is ring's AES-256-GCM (its assembly uses the CPU's AES and carry-less multiply
//! instructions, several GB/s a core); a ciphertext is the standard GCM one with its 16-byte tag
//! appended, so what any AES-256-GCM sealed opens here (a test checks it against RustCrypto's
//! `aes-gcm`, which sealed batches before).

use crate::types::{DiskId, ItemId, Seq};
use crate::wire::SealedBatch;
use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("authentication failed for item {item} disk {disk} seq {first}..={last}: the batch was altered, truncated or sealed under another key")]
    Auth { item: ItemId, disk: DiskId, first: Seq, last: Seq },
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("item {item}: epoch {epoch} of its data key has sealed {seals} batches, the most one key may; waiting for a new key from the configuration server")]
    Exhausted { item: ItemId, epoch: u32, seals: u64 },
    #[error("item {item}: a batch sealed under key epoch {epoch}, which this service does not hold (rotated away, or not yet assigned)")]
    UnknownEpoch { item: ItemId, epoch: u32 },
}

/// The data key of one protected item.
#[derive(Clone)]
pub struct ItemKey {
    cipher: Arc<LessSafeKey>,
    /// The key's bytes, to tell two keys apart (never printed).
    raw: [u8; 32],
}

impl std::fmt::Debug for ItemKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ItemKey(..)")
    }
}

impl ItemKey {
    pub fn from_bytes(key: &[u8; 32]) -> Self {
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("an AES-256 key is 32 bytes");
        ItemKey { cipher: Arc::new(LessSafeKey::new(unbound)), raw: *key }
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

    /// Seals `payload` as epoch `epoch` of the item's key.
    #[allow(clippy::too_many_arguments)]
    pub fn seal(
        &self,
        epoch: u32,
        item: ItemId,
        disk: DiskId,
        disk_size: u64,
        first: Seq,
        last: Seq,
        payload: &[u8],
    ) -> SealedBatch {
        let mut buf = Vec::with_capacity(payload.len() + AES_256_GCM.tag_len());
        buf.extend_from_slice(payload);
        self.seal_owned(epoch, item, disk, disk_size, first, last, buf)
    }

    /// [`Self::seal`] in place: `payload` becomes the ciphertext (no copy when it has room for the
    /// 16-byte tag).
    #[allow(clippy::too_many_arguments)]
    pub fn seal_owned(
        &self,
        epoch: u32,
        item: ItemId,
        disk: DiskId,
        disk_size: u64,
        first: Seq,
        last: Seq,
        mut payload: Vec<u8>,
    ) -> SealedBatch {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = aad(epoch, item, disk, disk_size, first, last);
        self.cipher
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut payload)
            .expect("AES-GCM sealing of a buffer under 64 GiB cannot fail");
        SealedBatch { epoch, item, disk, disk_size, first, last, nonce, ciphertext: payload }
    }

    pub fn open(&self, b: &SealedBatch) -> Result<Vec<u8>, SealError> {
        let aad = aad(b.epoch, b.item, b.disk, b.disk_size, b.first, b.last);
        let mut buf = b.ciphertext.clone();
        let len = self
            .cipher
            .open_in_place(Nonce::assume_unique_for_key(b.nonce), Aad::from(aad), &mut buf)
            .map_err(|_| SealError::Auth { item: b.item, disk: b.disk, first: b.first, last: b.last })?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// The sealing format bound into every batch: apart from the wire protocol's version, so batches
/// cached before an upgrade that changes only the protocol still open.
pub const SEAL_FORMAT: u32 = 1;

fn aad(epoch: u32, item: ItemId, disk: DiskId, disk_size: u64, first: Seq, last: Seq) -> [u8; 48] {
    let mut a = [0u8; 48];
    a[0..4].copy_from_slice(&SEAL_FORMAT.to_le_bytes());
    a[4..12].copy_from_slice(&item.0.to_le_bytes());
    a[12..20].copy_from_slice(&disk.0.to_le_bytes());
    a[20..28].copy_from_slice(&disk_size.to_le_bytes());
    a[28..36].copy_from_slice(&first.0.to_le_bytes());
    a[36..44].copy_from_slice(&last.0.to_le_bytes());
    a[44..48].copy_from_slice(&epoch.to_le_bytes());
    a
}

/// Most seals one process makes under one epoch of a key: far below the 2^32 that random 96-bit
/// nonces allow, and far above where the configuration server rotates ([`ROTATE_AFTER_SEALS`]).
pub const SEAL_LIMIT: u64 = 1 << 30;

/// Seals under one epoch after which the configuration server gives the item a new key.
pub const ROTATE_AFTER_SEALS: u64 = 1 << 24;

/// The epochs of one item's data key: seals under the newest (counting them), opens any.
#[derive(Debug)]
pub struct ItemKeys {
    epochs: std::collections::BTreeMap<u32, ItemKey>,
    sealed: std::sync::atomic::AtomicU64,
    limit: u64,
}

impl ItemKeys {
    /// One key as epoch 0 (a static deployment's key file).
    pub fn single(key: ItemKey) -> ItemKeys {
        ItemKeys::new([(0, key)]).expect("one epoch")
    }

    /// The given epochs; the newest seals. `None` when there is none.
    pub fn new(epochs: impl IntoIterator<Item = (u32, ItemKey)>) -> Option<ItemKeys> {
        let epochs: std::collections::BTreeMap<u32, ItemKey> = epochs.into_iter().collect();
        (!epochs.is_empty()).then(|| ItemKeys { epochs, sealed: Default::default(), limit: SEAL_LIMIT })
    }

    /// The same keys refusing after `limit` seals (tests).
    pub fn with_limit(mut self, limit: u64) -> ItemKeys {
        self.limit = limit;
        self
    }

    /// The epoch new batches are sealed under.
    pub fn current_epoch(&self) -> u32 {
        *self.epochs.keys().next_back().expect("at least one epoch")
    }

    pub fn epochs(&self) -> Vec<u32> {
        self.epochs.keys().copied().collect()
    }

    /// Whether `other` holds the same keys under the same epochs.
    pub fn same_keys(&self, other: &ItemKeys) -> bool {
        self.epochs.len() == other.epochs.len()
            && self.epochs.iter().zip(&other.epochs).all(|((e, k), (f, l))| e == f && k.raw == l.raw)
    }

    /// Seals made under the current epoch by this holder.
    pub fn seals(&self) -> u64 {
        self.sealed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Seals `payload` under the current epoch, counting it; refused once the epoch sealed
    /// [`SEAL_LIMIT`] batches here (a new epoch must come first).
    pub fn seal(
        &self,
        item: ItemId,
        disk: DiskId,
        disk_size: u64,
        first: Seq,
        last: Seq,
        payload: &[u8],
    ) -> Result<SealedBatch, SealError> {
        let mut buf = Vec::with_capacity(payload.len() + AES_256_GCM.tag_len());
        buf.extend_from_slice(payload);
        self.seal_owned(item, disk, disk_size, first, last, buf)
    }

    /// [`Self::seal`] in place (see [`ItemKey::seal_owned`]).
    pub fn seal_owned(
        &self,
        item: ItemId,
        disk: DiskId,
        disk_size: u64,
        first: Seq,
        last: Seq,
        payload: Vec<u8>,
    ) -> Result<SealedBatch, SealError> {
        let epoch = self.current_epoch();
        let n = self.sealed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n >= self.limit {
            self.sealed.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            return Err(SealError::Exhausted { item, epoch, seals: n });
        }
        Ok(self.epochs[&epoch].seal_owned(epoch, item, disk, disk_size, first, last, payload))
    }

    /// Opens a batch with the key of its epoch.
    pub fn open(&self, b: &SealedBatch) -> Result<Vec<u8>, SealError> {
        let key = self.epochs.get(&b.epoch).ok_or(SealError::UnknownEpoch { item: b.item, epoch: b.epoch })?;
        key.open(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed() -> (ItemKey, SealedBatch) {
        let (_, key) = ItemKey::generate();
        let s = key.seal(0, ItemId(1), DiskId(2), 1 << 20, Seq(3), Seq(9), b"payload bytes");
        (key, s)
    }

    #[test]
    fn epochs_seal_under_the_newest_open_any_and_stop_at_the_limit() {
        let (k0, k1) = (ItemKey::generate().1, ItemKey::generate().1);
        let old = ItemKeys::single(k0.clone());
        let before = old.seal(ItemId(1), DiskId(1), 1 << 20, Seq(1), Seq(2), b"old").unwrap();
        assert_eq!(before.epoch, 0);
        let keys = ItemKeys::new([(0, k0), (1, k1)]).unwrap().with_limit(2);
        let after = keys.seal(ItemId(1), DiskId(1), 1 << 20, Seq(3), Seq(4), b"new").unwrap();
        assert_eq!((after.epoch, keys.current_epoch()), (1, 1));
        assert_eq!(keys.open(&before).unwrap(), b"old", "a batch of the previous epoch still opens");
        assert_eq!(keys.open(&after).unwrap(), b"new");
        assert!(old.open(&after).is_err(), "the old holder lacks the new epoch");
        let mut moved = after.clone();
        moved.epoch = 0;
        assert!(keys.open(&moved).is_err(), "the epoch is bound into the associated data");
        keys.seal(ItemId(1), DiskId(1), 1 << 20, Seq(5), Seq(5), b"x").unwrap();
        assert!(matches!(
            keys.seal(ItemId(1), DiskId(1), 1 << 20, Seq(6), Seq(6), b"x"),
            Err(SealError::Exhausted { epoch: 1, seals: 2, .. })
        ));
        assert_eq!(keys.seals(), 2);
        assert!(ItemKeys::new([]).is_none());
    }

    /// The wire format is standard AES-256-GCM: batches sealed by RustCrypto's `aes-gcm` (which sealed
    /// them before, so process-server caches hold such batches across an upgrade) open here, and the
    /// other way round; the associated data binds the same fields in both.
    #[test]
    fn batches_are_standard_aes_gcm_and_open_across_implementations() {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let (raw, key) = ItemKey::generate();
        let other = aes_gcm::Aes256Gcm::new((&raw).into());
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let s = key.seal(3, ItemId(1), DiskId(2), 1 << 20, Seq(3), Seq(9), &payload);
        let aad = aad(3, ItemId(1), DiskId(2), 1 << 20, Seq(3), Seq(9));
        let plain = other
            .decrypt(aes_gcm::Nonce::from_slice(&s.nonce), Payload { msg: &s.ciphertext, aad: &aad })
            .expect("aes-gcm opens what ring sealed");
        assert_eq!(plain, payload);
        let nonce = [7u8; 12];
        let ciphertext =
            other.encrypt(aes_gcm::Nonce::from_slice(&nonce), Payload { msg: &payload, aad: &aad }).unwrap();
        let theirs = SealedBatch { nonce, ciphertext, ..s.clone() };
        assert_eq!(key.open(&theirs).unwrap(), payload, "ring opens what aes-gcm sealed");
        let mut moved = theirs;
        moved.first = Seq(4);
        assert!(key.open(&moved).is_err(), "the same fields are bound");
    }

    #[test]
    fn round_trip() {
        let (key, s) = sealed();
        assert_eq!(key.open(&s).unwrap(), b"payload bytes");
    }

    #[test]
    fn nonces_differ() {
        let (key, s) = sealed();
        let t = key.seal(0, ItemId(1), DiskId(2), 1 << 20, Seq(3), Seq(9), b"payload bytes");
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
    keys: std::collections::HashMap<ItemId, std::sync::Arc<ItemKeys>>,
}

impl KeyRing {
    /// Static deployments: one key file per item, epoch 0.
    pub fn load(items: &[ItemKeyConfig]) -> Result<KeyRing, SealError> {
        let mut keys = std::collections::HashMap::new();
        for i in items {
            keys.insert(ItemId(i.id), std::sync::Arc::new(ItemKeys::single(ItemKey::load(&i.key_file)?)));
        }
        Ok(KeyRing { keys })
    }
    pub fn from_keys(keys: impl IntoIterator<Item = (ItemId, std::sync::Arc<ItemKeys>)>) -> KeyRing {
        KeyRing { keys: keys.into_iter().collect() }
    }

    pub fn get(&self, item: ItemId) -> Option<&std::sync::Arc<ItemKeys>> {
        self.keys.get(&item)
    }
}
