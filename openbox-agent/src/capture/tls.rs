//! Finding the libssl copies a process uses, and the functions to probe in them.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSymbol};

use super::SSL_FUNCTIONS;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("uprobe target {path} not found ({reason}): check the path, or that the library still exists")]
    NotFound { path: PathBuf, reason: String },
    #[error("uprobe target {path} is not an ELF object ({reason}): it must be a libssl shared library, or a binary that exports SSL_write/SSL_read")]
    NotElf { path: PathBuf, reason: String },
    #[error("uprobe target {path} defines none of SSL_write, SSL_write_ex, SSL_read, SSL_read_ex: it is not a libssl (give the libssl.so the program maps, see /proc/PID/maps)")]
    NoSymbols { path: PathBuf },
    #[error("uprobe on {path} {func} failed: {reason} — run as root or grant the capabilities ({}); on kernels whose uprobe perf events refuse CAP_PERFMON (Linux 6.18 measured) also CAP_SYS_ADMIN; and check that the file is still there", crate::preflight::SETCAP)]
    Attach {
        path: PathBuf,
        func: String,
        reason: String,
    },
    #[error("{0}")]
    Internal(String),
}

/// The probed libssl functions that `path` defines (not merely imports).
pub fn ssl_symbols(path: &Path) -> Result<Vec<String>, AttachError> {
    let data = std::fs::read(path).map_err(|e| AttachError::NotFound {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let file = object::File::parse(&*data).map_err(|e| AttachError::NotElf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let wanted: BTreeSet<&str> = SSL_FUNCTIONS.iter().map(|(f, _)| *f).collect();
    let mut found = BTreeSet::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if sym.is_undefined() {
            continue;
        }
        if let Ok(name) = sym.name() {
            // Versioned names appear as "SSL_write@@OPENSSL_3.0.0" in some tables.
            let base = name.split('@').next().unwrap_or(name);
            if wanted.contains(base) {
                found.insert(base.to_string());
            }
        }
    }
    if found.is_empty() {
        return Err(AttachError::NoSymbols {
            path: path.to_path_buf(),
        });
    }
    Ok(found.into_iter().collect())
}

/// Whether a mapped file is worth checking for libssl symbols: named like libssl, or
/// the process's executable (node and others link OpenSSL in statically).
pub fn may_hold_libssl(path: &str, exe: Option<&str>) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.contains("libssl") || Some(path) == exe
}

/// The system's libssl copies (from `ldconfig -p`, then usual paths).
pub fn system_libssl() -> Vec<PathBuf> {
    let mut out = BTreeSet::new();
    if let Ok(o) = std::process::Command::new("ldconfig").arg("-p").output() {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some((name, path)) = line.split_once("=>") {
                if name.trim().starts_with("libssl.so") {
                    out.insert(PathBuf::from(path.trim()));
                }
            }
        }
    }
    for p in [
        "/usr/lib/x86_64-linux-gnu/libssl.so.3",
        "/lib/x86_64-linux-gnu/libssl.so.3",
        "/usr/lib64/libssl.so.3",
    ] {
        let p = PathBuf::from(p);
        if p.exists() {
            out.insert(p);
        }
    }
    let mut seen = BTreeSet::new();
    out.into_iter()
        .filter(|p| p.canonicalize().map(|c| seen.insert(c)).unwrap_or(false))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libssl_copies_and_executables_are_worth_checking() {
        assert!(may_hold_libssl(
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            None
        ));
        assert!(may_hold_libssl(
            "/opt/venv/lib/python3.11/site-packages/psycopg2_binary.libs/libssl-81ffa89e.so.3",
            None
        ));
        assert!(!may_hold_libssl("/usr/lib/libcrypto.so.3", None));
        assert!(may_hold_libssl("/usr/bin/node", Some("/usr/bin/node")));
        assert!(!may_hold_libssl(
            "/usr/bin/python3.11",
            Some("/usr/bin/node")
        ));
    }

    #[test]
    fn a_file_without_libssl_symbols_is_refused_with_its_path() {
        let err = ssl_symbols(Path::new("/etc/hostname"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/hostname"), "{err}");
        let err = ssl_symbols(Path::new("/nonexistent/libssl.so.3"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not found"), "{err}");
    }
}
