//! The split record of a disk: written next to a disk file when a failover commits it, so that the
//! agent that fronts the disk afterwards knows at which generation the two sites parted and which
//! ranges the commit itself rewrote (the point's rollback and the writes made before the commit).
//!
//! ```text
//! master target commit --> <disk>.srsplit {generation, changed ranges} --> agent reprotect(baseline)
//!                                                                          marks the ranges dirty
//! ```
//! The file is untrusted disk content: every field is checked against the disk before use.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub version: u32,
    /// The generation the sites parted at (the configuration server's id for the failover).
    pub generation: u64,
    pub disk_size: u64,
    /// Byte ranges (offset, length) the commit wrote, relative to the state both sites shared.
    pub changed: Vec<(u64, u64)>,
}

/// Where the split record of the disk at `disk` lives.
pub fn path_for(disk: &Path) -> PathBuf {
    let mut p = disk.as_os_str().to_owned();
    p.push(".srsplit");
    PathBuf::from(p)
}

impl Split {
    /// Bytes the changed ranges cover.
    pub fn changed_bytes(&self) -> u64 {
        self.changed.iter().map(|r| r.1).sum()
    }

    pub fn write(&self, disk: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        crate::crashsafe::write_file(&path_for(disk), &bytes)
    }

    /// Reads the split record of `disk` (of `disk_size` bytes): `None` when there is none, an error
    /// naming the file when it is unreadable or does not fit the disk.
    pub fn read(disk: &Path, disk_size: u64) -> Result<Option<Split>, String> {
        let path = path_for(disk);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let s: Split =
            serde_json::from_slice(&bytes).map_err(|e| format!("{} is not a split record: {e}", path.display()))?;
        if s.version != VERSION {
            return Err(format!(
                "{}: split record version {} is not supported (expected {VERSION})",
                path.display(),
                s.version
            ));
        }
        if s.disk_size != disk_size {
            return Err(format!(
                "{}: recorded for a disk of {} bytes, the disk is {disk_size} bytes",
                path.display(),
                s.disk_size
            ));
        }
        if s.generation == 0 {
            return Err(format!("{}: generation 0 is not valid", path.display()));
        }
        for (off, len) in &s.changed {
            if off.checked_add(*len).is_none_or(|end| end > disk_size) {
                return Err(format!("{}: range {off}+{len} lies outside the disk", path.display()));
            }
        }
        Ok(Some(s))
    }
}

/// Merges (offset, length) ranges into sorted, disjoint ones.
pub fn coalesce(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (off, len) in ranges {
        match out.last_mut() {
            Some(last) if off <= last.0 + last.1 => last.1 = last.1.max(off + len - last.0),
            _ => out.push((off, len)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_overlapping_and_touching_ranges() {
        assert_eq!(coalesce(vec![(10, 5), (0, 4), (4, 2), (12, 10), (30, 0)]), vec![(0, 6), (10, 12)]);
    }

    #[test]
    fn rejects_records_that_do_not_fit_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        let s = Split { version: VERSION, generation: 7, disk_size: 100, changed: vec![(90, 20)] };
        s.write(&disk).unwrap();
        assert!(Split::read(&disk, 100).unwrap_err().contains("outside the disk"));
        let s = Split { changed: vec![(90, 10)], ..s };
        s.write(&disk).unwrap();
        assert_eq!(Split::read(&disk, 100).unwrap(), Some(s.clone()));
        assert!(Split::read(&disk, 200).unwrap_err().contains("200 bytes"));
        std::fs::write(path_for(&disk), b"{garbage").unwrap();
        assert!(Split::read(&disk, 100).unwrap_err().contains("not a split record"));
        assert_eq!(Split::read(&dir.path().join("other.img"), 100).unwrap(), None);
    }
}
