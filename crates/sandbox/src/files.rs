//! Files a playground writes: private directories that belong to this
//! process (swept once their owner is gone), and TOML strings for the
//! tenant files written into them. Shared by the throwaway cluster, the
//! demo, the tests and the benchmark.

use std::fs::{self, DirBuilder};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, ErrorKind};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process;
use std::time::Instant;

/// A directory `<base>/<prefix><pid>-<random>`, readable by its owner
/// only, removed with its contents when dropped.
#[derive(Debug)]
pub struct OwnedDir {
    path: PathBuf,
}

impl OwnedDir {
    /// Creates the directory under `base`, after removing those of the
    /// same prefix whose owner is gone (killed, say) and that `stale`
    /// agrees may go (a directory whose server still runs may not).
    pub fn create(base: &Path, prefix: &str, stale: impl Fn(&Path) -> bool) -> io::Result<OwnedDir> {
        sweep(base, prefix, stale);
        loop {
            let path = base.join(format!("{prefix}{}-{:016x}", process::id(), random()));
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(OwnedDir { path }),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `name` in the directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> io::Result<PathBuf> {
        let path = self.join(name);
        fs::write(&path, text)?;
        Ok(path)
    }
}

impl Drop for OwnedDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn sweep(base: &Path, prefix: &str, stale: impl Fn(&Path) -> bool) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let owner = entry.file_name().to_str().and_then(|name| owner_pid(name, prefix));
        let dir = entry.path();
        if owner.is_some_and(|pid| !is_alive(pid)) && stale(&dir) {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// The process id in a directory name `<prefix><pid>-<random>`.
pub fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

/// Whether a process with this id exists (Linux: `/proc/<pid>`).
pub fn is_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Random enough for names and ports (the standard library's seeded hasher).
pub fn random() -> u64 {
    RandomState::new().hash_one(process::id())
}

/// Writes `text` aside and renames it over `path`, as editors and `git
/// checkout` save; returns the moment just before the rename, when the
/// file changes for whoever watches it.
pub fn replace_file(path: &Path, text: &str) -> io::Result<Instant> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // A leading dot and a suffix other than `.toml`: no loader takes it.
    let aside = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&aside, text)?;
    let at = Instant::now();
    fs::rename(&aside, path)?;
    Ok(at)
}

/// A TOML basic string.
pub fn toml_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_quoted_for_toml() {
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(toml_string("line\nnext"), "\"line\\u000Anext\"");
    }

    #[test]
    fn the_owner_is_read_from_the_name() {
        assert_eq!(owner_pid("crm-connect-pg-123-00ff", "crm-connect-pg-"), Some(123));
        assert_eq!(owner_pid("crm-connect-pg-x-00ff", "crm-connect-pg-"), None);
        assert_eq!(owner_pid("other-123-00ff", "crm-connect-pg-"), None);
    }

    #[test]
    fn a_directory_of_a_gone_owner_is_swept_and_ours_is_removed_when_dropped() {
        let base = std::env::temp_dir();
        // No process has an id this large (Linux caps them at 2^22).
        let gone = base.join(format!("crm-connect-files-test-{}-00", u32::MAX));
        fs::create_dir_all(&gone).unwrap();
        let ours = OwnedDir::create(&base, "crm-connect-files-test-", |_| true).unwrap();
        assert!(!gone.exists());
        let path = ours.write("a.toml", "x = 1").unwrap();
        assert!(path.exists());
        let dir = ours.path().to_path_buf();
        drop(ours);
        assert!(!dir.exists());
    }
}
