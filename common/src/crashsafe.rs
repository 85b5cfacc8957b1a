//! The one path by which a small file is made durable: write a temporary file beside it, fsync it,
//! rename it over the target, fsync the directory. A reader sees the old or the new file, never a mix.

use std::io::Write;
use std::path::Path;

pub fn write_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
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

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_atomically() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state");
        super::write_file(&p, b"one").unwrap();
        super::write_file(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "no temporary file left behind");
    }
}
