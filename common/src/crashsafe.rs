//! The one path by which a small file is made durable: write a temporary file beside it, fsync it,
//! rename it over the target, fsync the directory. A reader sees the old or the new file, never a mix.
//!
//! A service's own state goes through [`write_record`]: one header line naming the record's kind, its
//! format version and a CRC-32C of the body, then the body as JSON.
//!
//! ```text
//! sr-record disk-state 1 9a3b0c11
//! {"copy":{...},"resync":{...}}
//! ```
//!
//! [`read_record`] checks all three: a damaged body, another kind of record, or a format newer than
//! this build reads is a typed error that names the file, never a silent default. A file without the
//! header is read as version 0 (what releases before the header wrote).

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &str = "sr-record";

pub fn write_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_file_mode(path, &[contents], 0o644)
}

/// [`write_file`] of the concatenation of `parts`, written without joining them first.
pub fn write_file_parts(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    write_file_mode(path, parts, 0o644)
}

/// [`write_file`] for a secret (a private key, a token, a data key): the file is created readable
/// and writable by its owner only, so no other user can open it at any moment, even before the
/// rename.
pub fn write_secret(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_file_mode(path, &[contents], 0o600)
}

fn write_file_mode(path: &Path, parts: &[&[u8]], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    // A temporary file left by a crash may have other permissions: never write a secret into it.
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        let mut slices: Vec<std::io::IoSlice> =
            parts.iter().filter(|p| !p.is_empty()).map(|p| std::io::IoSlice::new(p)).collect();
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            match f.write_vectored(slices) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => std::io::IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        f.sync_data()
    })();
    if let Err(e) = written {
        // A full volume must not keep the partial copy: it would hold the space the retry needs.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Why a state record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{path}: {kind} format {found} was written by a newer release (this one reads up to {supported}); \
         run that release again, or move the file away to start this state afresh"
    )]
    Newer { path: PathBuf, kind: String, found: u32, supported: u32 },
    #[error("{path} holds a {found} record, not the {expected} expected there")]
    WrongKind { path: PathBuf, expected: String, found: String },
    #[error("{path} is damaged ({reason}); restore it from a backup or move it away to start afresh")]
    Corrupt { path: PathBuf, reason: String },
}

/// A record read back: the format version it was written in, and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<T> {
    pub version: u32,
    pub value: T,
}

/// Writes `value` as a record of `kind` in format `version`, crash-safely.
pub fn write_record<T: Serialize>(path: &Path, kind: &str, version: u32, value: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let mut bytes = format!("{MAGIC} {kind} {version} {:08x}\n", crc32c::crc32c(&body)).into_bytes();
    bytes.extend_from_slice(&body);
    write_file(path, &bytes)
}

/// Reads a record of `kind` that this build reads up to format `supported`; `None` when there is no
/// file. The caller upgrades older versions from [`Record::version`].
pub fn read_record<T: DeserializeOwned>(
    path: &Path,
    kind: &str,
    supported: u32,
) -> Result<Option<Record<T>>, RecordError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RecordError::Io { path: path.into(), source }),
    };
    decode_record(path, kind, supported, &bytes).map(Some)
}

/// The checks of [`read_record`] on bytes already read.
pub fn decode_record<T: DeserializeOwned>(
    path: &Path,
    kind: &str,
    supported: u32,
    bytes: &[u8],
) -> Result<Record<T>, RecordError> {
    let corrupt = |reason: String| RecordError::Corrupt { path: path.into(), reason };
    let (version, body) = if bytes.starts_with(MAGIC.as_bytes()) {
        let end = bytes.iter().position(|b| *b == b'\n').ok_or_else(|| corrupt("no end of header".into()))?;
        let header = std::str::from_utf8(&bytes[..end]).map_err(|_| corrupt("header is not text".into()))?;
        let fields: Vec<&str> = header.split(' ').collect();
        let [_, found_kind, version, crc] = fields[..] else {
            return Err(corrupt(format!("header {header:?} is not `{MAGIC} KIND VERSION CRC`")));
        };
        if found_kind != kind {
            return Err(RecordError::WrongKind { path: path.into(), expected: kind.into(), found: found_kind.into() });
        }
        let version: u32 = version.parse().map_err(|_| corrupt(format!("version {version:?}")))?;
        if version > supported {
            return Err(RecordError::Newer { path: path.into(), kind: kind.into(), found: version, supported });
        }
        let body = &bytes[end + 1..];
        let crc = u32::from_str_radix(crc, 16).map_err(|_| corrupt(format!("checksum {crc:?}")))?;
        if crc32c::crc32c(body) != crc {
            return Err(corrupt("its checksum does not match".into()));
        }
        (version, body)
    } else {
        (0, bytes)
    };
    let value = serde_json::from_slice(body).map_err(|e| corrupt(format!("format {version}: {e}")))?;
    Ok(Record { version, value })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_secret_is_owner_only_and_a_stale_temporary_file_is_not_reused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("k.key");
        // A temporary file left world-readable by a crash must not carry the secret.
        std::fs::write(d.path().join(".k.key.tmp"), b"old").unwrap();
        std::fs::set_permissions(d.path().join(".k.key.tmp"), std::fs::Permissions::from_mode(0o644)).unwrap();
        super::write_secret(&path, b"secret").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
    }

    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct State {
        n: u64,
    }

    #[test]
    fn records_round_trip_and_refuse_what_they_cannot_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state");
        assert!(read_record::<State>(&p, "state", 1).unwrap().is_none());
        write_record(&p, "state", 1, &State { n: 7 }).unwrap();
        assert_eq!(read_record(&p, "state", 1).unwrap(), Some(Record { version: 1, value: State { n: 7 } }));
        assert!(matches!(read_record::<State>(&p, "state", 0), Err(RecordError::Newer { found: 1, supported: 0, .. })));
        assert!(matches!(read_record::<State>(&p, "other", 1), Err(RecordError::WrongKind { .. })));
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 2;
        bytes[last] = b'8';
        std::fs::write(&p, &bytes).unwrap();
        let e = read_record::<State>(&p, "state", 1).unwrap_err();
        assert!(matches!(e, RecordError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains(&p.display().to_string()), "names the file: {e}");
        std::fs::write(&p, br#"{"n":3}"#).unwrap();
        assert_eq!(read_record(&p, "state", 1).unwrap(), Some(Record { version: 0, value: State { n: 3 } }));
        for bad in [&b"sr-record state"[..], b"sr-record state 1\n{}", b"sr-record state x 0\n{}", b"\xff\xfe"] {
            std::fs::write(&p, bad).unwrap();
            assert!(matches!(read_record::<State>(&p, "state", 1), Err(RecordError::Corrupt { .. })), "{bad:?}");
        }
    }

    #[test]
    fn replaces_atomically() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state");
        write_file(&p, b"one").unwrap();
        write_file(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "no temporary file left behind");
    }

    #[test]
    fn an_empty_file_and_a_file_of_parts_are_written_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state");
        write_file(&p, b"").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"");
        let big = vec![b'7'; 3 << 20];
        write_file_parts(&p, &[b"head", b"", &big, b"tail"]).unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len(), 8 + big.len());
        assert!(got.starts_with(b"head7") && got.ends_with(b"7tail"));
        write_file_parts(&p, &[]).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"");
    }
}
