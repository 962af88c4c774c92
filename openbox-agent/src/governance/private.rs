//! Files that can hold captured data (activity inputs and outputs, HTTP bodies, SQL) are
//! readable by their owner only: created 0600, in directories the agent creates 0700, and
//! tightened when an earlier run (or another tool) left them readable by others. The
//! agent runs as root on a shared node; anything looser lets any local user read what
//! root's workers did.

use std::{
    fs::{self, DirBuilder, OpenOptions, Permissions},
    io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

pub const FILE_MODE: u32 = 0o600;
pub const DIR_MODE: u32 = 0o700;

/// Open options that create the file 0600 (the umask can only narrow it).
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Takes group and other permissions off an existing file or directory.
pub fn tighten(path: &Path, mode: u32) -> io::Result<()> {
    let current = fs::metadata(path)?.permissions().mode();
    if current & 0o077 != 0 {
        fs::set_permissions(path, Permissions::from_mode((current & 0o7700) | mode))?;
        tracing::warn!(path = %path.display(), from = format!("{:o}", current & 0o7777), to = format!("{mode:o}"), "made a file holding captured data private");
    }
    Ok(())
}

/// Creates `dir` (and its missing parents) 0700, or tightens it if it exists.
pub fn dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    tighten(dir, DIR_MODE)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::governance::testutil::TempDir;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn new_files_and_directories_are_private_whatever_the_umask() {
        let t = TempDir::new("private");
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let d = t.path().join("a/b");
        dir(&d).unwrap();
        let f = d.join("events.jsonl");
        options().create(true).append(true).open(&f).unwrap();
        unsafe { libc::umask(old) };
        assert_eq!(mode(&d), DIR_MODE);
        assert_eq!(mode(&f), FILE_MODE);
    }

    #[test]
    fn files_left_readable_by_others_are_tightened() {
        let t = TempDir::new("private");
        let f = t.path().join("old.jsonl");
        fs::File::create(&f).unwrap().write_all(b"{}\n").unwrap();
        fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        tighten(&f, FILE_MODE).unwrap();
        assert_eq!(mode(&f), FILE_MODE);
        fs::set_permissions(t.path(), Permissions::from_mode(0o755)).unwrap();
        dir(t.path()).unwrap();
        assert_eq!(mode(t.path()), DIR_MODE);
    }
}
