//! A disk image or block device opened for positioned I/O.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub struct DiskFile {
    file: File,
    size: u64,
    path: PathBuf,
}

impl DiskFile {
    /// Opens an existing file or block device; its size is its current length.
    pub fn open(path: &Path, writable: bool) -> std::io::Result<DiskFile> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        let size = file_size(&file)?;
        Ok(DiskFile { file, size, path: path.to_path_buf() })
    }

    /// Opens `path`, creating it as a sparse file of `size` bytes if it does not exist. An existing file of
    /// another size is an error.
    pub fn open_or_create(path: &Path, size: u64) -> std::io::Result<DiskFile> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let cur = file_size(&file)?;
        if cur == 0 && size > 0 {
            file.set_len(size)?;
            file.sync_all()?;
        } else if cur != size {
            return Err(std::io::Error::other(format!(
                "{} is {cur} bytes but the source disk is {size} bytes",
                path.display()
            )));
        }
        Ok(DiskFile { file, size, path: path.to_path_buf() })
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Makes a range read as zeroes: a hole punched in a file, else zeroes written.
    pub fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.zero_with(offset, len, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
    }

    /// Makes a range read as zeroes and keeps it allocated (NBD's NO_HOLE): the file system's zero
    /// range, else zeroes written.
    pub fn zero_allocated(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.zero_with(offset, len, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
    }

    fn zero_with(&self, offset: u64, len: u64, mode: libc::c_int) -> std::io::Result<()> {
        // SAFETY: fallocate on a valid open descriptor with in-range arguments has no memory effects.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            return Ok(());
        }
        let zeroes = vec![0u8; (1 << 20).min(len as usize)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// What `offset..offset+len` holds, in order: data, or holes that read as zeroes (the file
    /// system's SEEK_DATA and SEEK_HOLE). At most `max` extents, covering a prefix of the range when
    /// there are more. Devices without hole information report data.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<Extent> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max.max(1) {
            let (hole, to) = match self.seek(pos, libc::SEEK_DATA) {
                Seek::At(d) if d > pos => (true, d),
                Seek::At(_) => match self.seek(pos, libc::SEEK_HOLE) {
                    Seek::At(h) if h > pos => (false, h),
                    _ => (false, end),
                },
                Seek::Beyond => (true, end),
                Seek::Unknown => (false, end),
            };
            let to = to.min(end);
            out.push(Extent { len: to - pos, hole });
            pos = to;
        }
        out
    }

    fn seek(&self, from: u64, whence: libc::c_int) -> Seek {
        // SAFETY: lseek on a valid descriptor has no memory effects.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), from as i64, whence) };
        if r >= 0 {
            Seek::At(r as u64)
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            Seek::Beyond
        } else {
            Seek::Unknown
        }
    }

    /// The next offset at or after `from` that may hold data (holes are skipped), or `None` past the
    /// last data. Devices without hole information report every offset as data.
    pub fn next_data(&self, from: u64) -> Option<u64> {
        if from >= self.size {
            return None;
        }
        match self.seek(from, libc::SEEK_DATA) {
            Seek::At(d) => Some(d),
            Seek::Beyond => None,
            Seek::Unknown => Some(from),
        }
    }
}

enum Seek {
    At(u64),
    /// ENXIO: no data (or hole) at or after the offset.
    Beyond,
    /// The file system or device cannot tell.
    Unknown,
}

/// A run of a disk: data, or a hole that reads as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub hole: bool,
}

/// `extents` (starting at `start`) with every part that `data` ranges (offset, length) overlap made
/// data: what another layer holds over a file's holes. Neighbours of the same kind are merged. Linear
/// in the extents and ranges once the ranges are sorted.
pub fn cover(extents: &[Extent], start: u64, data: &[(u64, u64)]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |len: u64, hole: bool| {
        if len == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.hole == hole => last.len += len,
            _ => out.push(Extent { len, hole }),
        }
    };
    // The ranges as a sorted union of disjoint [start, end) runs.
    let mut ranges: Vec<(u64, u64)> =
        data.iter().map(|&(o, l)| (o, o.saturating_add(l))).filter(|r| r.1 > r.0).collect();
    ranges.sort_unstable();
    let mut union: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match union.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => union.push((s, e)),
        }
    }
    let mut i = 0;
    let mut pos = start;
    for e in extents {
        let end = pos + e.len;
        if !e.hole {
            push(e.len, false);
            pos = end;
            continue;
        }
        while i < union.len() && union[i].1 <= pos {
            i += 1;
        }
        let mut cur = pos;
        let mut j = i;
        while j < union.len() && union[j].0 < end {
            let (ds, de) = (union[j].0.max(cur), union[j].1.min(end));
            push(ds - cur, true);
            push(de - ds, false);
            cur = de;
            j += 1;
        }
        push(end - cur, true);
        pos = end;
    }
    out
}

fn file_size(f: &File) -> std::io::Result<u64> {
    let meta = f.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // A block device: its size is where a seek to the end lands.
    // SAFETY: lseek on a valid descriptor has no memory effects.
    let end = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(end as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(len: u64, hole: bool) -> Extent {
        Extent { len, hole }
    }

    #[test]
    fn extents_follow_the_files_holes_and_stop_at_the_range() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("disk.img");
        let f = DiskFile::open_or_create(&path, 16 << 20).unwrap();
        f.write_at(4 << 20, &[1u8; 1 << 20]).unwrap();
        f.write_at(12 << 20, &[2u8; 1 << 20]).unwrap();
        let got = f.extents(0, 16 << 20, 64);
        assert_eq!(
            got,
            vec![e(4 << 20, true), e(1 << 20, false), e(7 << 20, true), e(1 << 20, false), e(3 << 20, true)]
        );
        assert_eq!(got.iter().map(|x| x.len).sum::<u64>(), 16 << 20);
        // A range inside: cut at both ends; at most `max` extents, a prefix.
        assert_eq!(
            f.extents((4 << 20) + 4096, 2 << 20, 64),
            vec![e((1 << 20) - 4096, false), e((1 << 20) + 4096, true)]
        );
        assert_eq!(f.extents(0, 16 << 20, 2), vec![e(4 << 20, true), e(1 << 20, false)]);
        // Past the end: nothing; a punched range is a hole again.
        assert!(f.extents(16 << 20, 4096, 64).is_empty());
        f.zero(4 << 20, 1 << 20).unwrap();
        assert_eq!(f.extents(0, 8 << 20, 64), vec![e(8 << 20, true)]);
    }

    #[test]
    fn covering_makes_holes_data_where_another_layer_holds_data() {
        let ext = [e(100, true), e(50, false), e(100, true)];
        // Nothing covers: unchanged.
        assert_eq!(cover(&ext, 1000, &[]), ext.to_vec());
        // Ranges over a hole, across a data extent, and outside the extents.
        let got = cover(&ext, 1000, &[(1010, 10), (1090, 70), (0, 5), (2000, 9)]);
        assert_eq!(got, vec![e(10, true), e(10, false), e(70, true), e(70, false), e(90, true)]);
        assert_eq!(got.iter().map(|x| x.len).sum::<u64>(), 250);
        // Overlapping ranges, and one covering everything.
        assert_eq!(
            cover(&ext, 1000, &[(1000, 60), (1020, 20)]),
            vec![e(60, false), e(40, true), e(50, false), e(100, true)]
        );
        assert_eq!(cover(&ext, 1000, &[(0, u64::MAX)]), vec![e(250, false)]);
    }
}
