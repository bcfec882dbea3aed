//! The reload diff: what a fresh read of the configuration adds, changes,
//! moves or removes among the tenants in force, keyed by slug. Pure — no
//! I/O, no logging, no timers: the daemon applies what [`changes`] returns.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use crate::config::{FileReport, TenantConfig};

/// SHA-256 of a tenant file's text (`None`: it could not be read).
pub(crate) type Digest = Option<[u8; 32]>;

/// What the diff needs of a tenant in force: where its file is and what
/// the file held when it was applied.
#[derive(Clone, Debug)]
pub(crate) struct InForce {
    pub(crate) file: PathBuf,
    pub(crate) digest: Digest,
}

/// Whether a tenant whose file did not change is applied again all the
/// same: at start and on SIGHUP it is, since secrets from the environment
/// or from credentials may have changed without the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reread {
    Changed,
    All,
}

/// One difference between the tenants in force and a fresh read. A tenant
/// is its slug: a file renamed with its slug kept is the same tenant.
#[derive(Debug)]
pub(crate) enum TenantChange {
    /// A slug not in force.
    Added { config: TenantConfig, digest: Digest },
    /// A tenant in force whose file changed (or is applied again, see
    /// [`Reread`]); `moved` when the file is at another path now.
    Changed { config: TenantConfig, digest: Digest, moved: bool },
    /// The same content at another path: only the path is new.
    Moved { slug: String, file: PathBuf },
    /// Neither a valid file with its slug nor an invalid file at its path.
    Removed(String),
}

/// The changes in the order they are best applied: files in reading order,
/// removals last (by slug), so that a cron expression moving from a removed
/// tenant to an added one keeps its job. A file that fails to validate
/// keeps the last good configuration at its path in force — duplicate slugs
/// among them, which the loader turns into invalid files.
pub(crate) fn changes(old: &HashMap<String, InForce>, loaded: &[FileReport], reread: Reread) -> Vec<TenantChange> {
    let mut present = BTreeSet::new();
    let mut changes = Vec::new();
    for file in loaded {
        let Some(config) = &file.tenant else {
            if let Some((slug, _)) = old.iter().find(|(_, known)| known.file == file.path) {
                present.insert(slug.as_str());
            }
            continue;
        };
        present.insert(config.slug.as_str());
        let Some(known) = old.get(&config.slug) else {
            changes.push(TenantChange::Added { config: config.clone(), digest: file.digest });
            continue;
        };
        let moved = known.file != config.file;
        if known.digest != file.digest || reread == Reread::All {
            changes.push(TenantChange::Changed { config: config.clone(), digest: file.digest, moved });
        } else if moved {
            changes.push(TenantChange::Moved { slug: config.slug.clone(), file: config.file.clone() });
        }
    }
    let mut gone: Vec<&String> = old.keys().filter(|slug| !present.contains(slug.as_str())).collect();
    gone.sort();
    changes.extend(gone.into_iter().map(|slug| TenantChange::Removed(slug.clone())));
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LoadOptions, parse_file};

    /// A file as loaded: its path, its slug when it is valid (`None`:
    /// invalid), and its content as one byte of digest.
    type File = (&'static str, Option<&'static str>, u8);

    fn report((path, slug, content): File) -> FileReport {
        let text =
            format!("[tenant]\nslug = \"{}\"\ndatabase_url = \"postgresql://localhost/t\"\n", slug.unwrap_or("t"));
        let mut report = parse_file(path.as_ref(), &text, &LoadOptions::default());
        assert!(report.tenant.is_some(), "the test tenant is valid: {:?}", report.problems);
        if slug.is_none() {
            report.tenant = None;
        }
        report.digest = Some([content; 32]);
        report
    }

    fn show(change: &TenantChange) -> String {
        match change {
            TenantChange::Added { config, .. } => format!("added {}", config.slug),
            TenantChange::Changed { config, moved: false, .. } => format!("changed {}", config.slug),
            TenantChange::Changed { config, moved: true, .. } => {
                format!("changed {} at {}", config.slug, config.file.display())
            }
            TenantChange::Moved { slug, file } => format!("moved {slug} to {}", file.display()),
            TenantChange::Removed(slug) => format!("removed {slug}"),
        }
    }

    /// `old`: the tenants in force as (slug, file, content).
    fn check(old: &[(&str, &str, u8)], loaded: &[File], reread: Reread, expected: &[&str]) {
        let old: HashMap<String, InForce> = old
            .iter()
            .map(|&(slug, file, content)| {
                (slug.to_string(), InForce { file: file.into(), digest: Some([content; 32]) })
            })
            .collect();
        let loaded: Vec<FileReport> = loaded.iter().copied().map(report).collect();
        let got: Vec<String> = changes(&old, &loaded, reread).iter().map(show).collect();
        assert_eq!(got, expected, "old {old:?}");
    }

    use Reread::{All, Changed};

    #[test]
    fn a_reload_changes_only_what_the_files_changed() {
        check(&[], &[], Changed, &[]);
        check(&[], &[("a.toml", Some("a"), 1)], Changed, &["added a"]);
        check(&[("a", "a.toml", 1)], &[("a.toml", Some("a"), 1)], Changed, &[]);
        check(&[("a", "a.toml", 1)], &[("a.toml", Some("a"), 2)], Changed, &["changed a"]);
        check(&[("a", "a.toml", 1)], &[("a.toml", Some("a"), 1)], All, &["changed a"]);
        check(&[("a", "a.toml", 1)], &[], Changed, &["removed a"]);
        // An invalid file keeps its last good configuration in force.
        check(&[("a", "a.toml", 1)], &[("a.toml", None, 2)], Changed, &[]);
        check(&[("a", "a.toml", 1)], &[("a.toml", None, 2)], All, &[]);
        check(&[("a", "a.toml", 1)], &[("b.toml", None, 2)], Changed, &["removed a"]);
        check(&[], &[("a.toml", None, 1)], Changed, &[]);
        // Restored to what is in force: nothing to do.
        check(&[("a", "a.toml", 1)], &[("a.toml", Some("a"), 1)], Changed, &[]);
        // Renamed with its slug kept: the same tenant.
        check(&[("a", "a.toml", 1)], &[("b.toml", Some("a"), 1)], Changed, &["moved a to b.toml"]);
        check(&[("a", "a.toml", 1)], &[("b.toml", Some("a"), 2)], Changed, &["changed a at b.toml"]);
        check(&[("a", "a.toml", 1)], &[("b.toml", Some("a"), 1)], All, &["changed a at b.toml"]);
        // Two files with one slug are both invalid: the one at the path in force keeps it.
        check(&[("a", "a.toml", 1)], &[("a.toml", None, 1), ("b.toml", None, 3)], Changed, &[]);
        check(&[("a", "a.toml", 1)], &[("b.toml", None, 3), ("c.toml", None, 3)], Changed, &["removed a"]);
        // A file that takes another slug: another tenant.
        check(&[("a", "a.toml", 1)], &[("a.toml", Some("b"), 2)], Changed, &["added b", "removed a"]);
        check(
            &[("a", "a.toml", 1), ("c", "c.toml", 1), ("b", "b.toml", 1)],
            &[("d.toml", Some("d"), 1), ("b.toml", Some("b"), 2)],
            Changed,
            &["added d", "changed b", "removed a", "removed c"],
        );
    }
}
