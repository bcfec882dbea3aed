//! Which files under `--config` are tenants: a file given directly, or every
//! `*.toml` directly inside a directory (symlinks followed; hidden files,
//! editor leftovers and `..data` farms ignored).

use std::path::{Path, PathBuf};

use super::problem::{Problem, Severity};

/// A tenant file larger than this is refused rather than parsed.
const MAX_FILE_BYTES: u64 = 1 << 20;

pub(crate) fn discover(path: &Path) -> Result<Vec<PathBuf>, Problem> {
    let meta = std::fs::metadata(path).map_err(|e| problem(path, format!("cannot read: {}", e.kind())))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|e| problem(path, format!("cannot list: {}", e.kind())))?;
    let mut files: Vec<PathBuf> =
        entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| is_tenant_file(p)).collect();
    files.sort();
    Ok(files)
}

/// `acme.toml` yes; `.acme.toml`, `acme.toml.swp`, `acme.toml~`, `acme.tmp`,
/// directories and dangling symlinks no.
pub fn is_tenant_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.')
        && name.len() > ".toml".len()
        && name.ends_with(".toml")
        && std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

pub(crate) fn read(path: &Path) -> Result<String, Problem> {
    let meta = std::fs::metadata(path).map_err(|e| problem(path, format!("cannot read: {}", e.kind())))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(problem(path, format!("is larger than {MAX_FILE_BYTES} bytes; a tenant file is a few lines")));
    }
    let bytes = std::fs::read(path).map_err(|e| problem(path, format!("cannot read: {}", e.kind())))?;
    String::from_utf8(bytes)
        .map_err(|e| problem(path, format!("is not UTF-8 (invalid byte at offset {})", e.utf8_error().valid_up_to())))
}

fn problem(path: &Path, message: String) -> Problem {
    Problem { severity: Severity::Error, file: path.to_path_buf(), position: None, key: None, message }
}
