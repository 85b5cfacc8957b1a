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
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
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

    /// The next offset at or after `from` that may hold data (holes are skipped), or `None` past the
    /// last data. Devices without hole information report every offset as data.
    pub fn next_data(&self, from: u64) -> Option<u64> {
        if from >= self.size {
            return None;
        }
        // SAFETY: lseek on a valid descriptor has no memory effects.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), from as i64, libc::SEEK_DATA) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENXIO) { None } else { Some(from) };
        }
        Some(r as u64)
    }
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
