//! Secret values and where they come from: a plain string, `{ env = … }`,
//! `{ file = … }` or `{ credential = … }` (systemd `LoadCredential=`).
//! A source that cannot be read is a validation error naming the key and the
//! source, never an empty string; messages never contain the value.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::DeValue;

use super::document::{Table, wrong_type};
use super::problem::Problems;
use crate::secret::Secret;

/// The keys of an inline secret-source table.
pub const SOURCE_KEYS: &[&str] = &["env", "file", "credential"];

/// Where `{ env = … }` and `{ credential = … }` look: the process
/// environment, or a fixed map (tests, `demo`).
#[derive(Clone, Debug, Default)]
pub struct Environment {
    fixed: Option<HashMap<String, String>>,
}

impl Environment {
    pub fn process() -> Self {
        Environment { fixed: None }
    }

    pub fn fixed(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        Environment { fixed: Some(vars.into_iter().collect()) }
    }

    pub fn var(&self, name: &str) -> Option<String> {
        match &self.fixed {
            Some(vars) => vars.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
    }
}

/// Reads the secret value at `key`; reports and returns `None` if it is
/// malformed or its source cannot be read.
pub(crate) fn read_secret(
    table: &Table,
    key: &str,
    dir: &Path,
    env: &Environment,
    problems: &mut Problems,
) -> Option<Spanned<Secret>> {
    let value = table.get(key)?;
    let path = table.path(key);
    let span = value.span();
    let resolved = match value.get_ref() {
        DeValue::String(s) => Ok(s.to_string()),
        DeValue::Table(source) => {
            let source = Table { name: &path, table: source, span: span.clone() };
            source.check_keys(SOURCE_KEYS, problems);
            let given: Vec<&str> = SOURCE_KEYS.iter().copied().filter(|k| source.get(k).is_some()).collect();
            if given.len() != 1 {
                problems.error(
                    Some(span),
                    format!("`{path}` must name exactly one source: {{ env = \"NAME\" }}, {{ file = \"PATH\" }} or {{ credential = \"NAME\" }}"),
                );
                return None;
            }
            let kind = given[0];
            let name = source.str(kind, problems)?.into_inner();
            resolve(kind, name, dir, env)
        }
        other => {
            problems.error(Some(span), wrong_type(&path, "a string or a source table like { env = \"NAME\" }", other));
            return None;
        }
    };
    match resolved {
        Ok(v) if v.is_empty() => {
            problems.error(Some(span), format!("`{path}` is empty"));
            None
        }
        Ok(v) => Some(Spanned::new(span, Secret::new(v))),
        Err(why) => {
            problems.error(Some(span), format!("`{path}`: {why}"));
            None
        }
    }
}

fn resolve(kind: &str, name: &str, dir: &Path, env: &Environment) -> Result<String, String> {
    match kind {
        "env" => env.var(name).ok_or_else(|| format!("environment variable {name} is not set")),
        "file" => {
            let path = dir.join(name);
            read_file(&path).map_err(|e| format!("cannot read file {}: {e}", path.display()))
        }
        _ => {
            let Some(dir) = env.var("CREDENTIALS_DIRECTORY") else {
                return Err(format!(
                    "credential {name} needs CREDENTIALS_DIRECTORY, which is not set (systemd sets it for LoadCredential=)"
                ));
            };
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(format!("credential name {name:?} must be a plain file name"));
            }
            let path = PathBuf::from(dir).join(name);
            read_file(&path).map_err(|e| format!("cannot read credential {name} ({}): {e}", path.display()))
        }
    }
}

/// The file's contents with one trailing newline stripped.
/// A secret file is at most this long: a key, a token, a password.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads a secret file: a regular file (after symlinks) of at most 64 KiB.
/// The type is checked before opening, so a FIFO (whose open would wait
/// for a writer), a device or a directory is an error, not a hang; the read
/// stops past the limit, so `/dev/zero`-like files cannot exhaust memory.
fn read_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| e.kind().to_string())?;
    if !meta.file_type().is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(format!("larger than {} KiB", MAX_SECRET_FILE / 1024));
    }
    let file = std::fs::File::open(path).map_err(|e| e.kind().to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE + 1).read_to_end(&mut bytes).map_err(|e| e.kind().to_string())?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(format!("larger than {} KiB", MAX_SECRET_FILE / 1024));
    }
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    Ok(text.to_string())
}
