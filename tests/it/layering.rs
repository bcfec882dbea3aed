//! The layering rule of ARCHITECTURE.md, checked on the source: each module
//! of `src/` names (`crate::…`) only modules of a lower layer, so the
//! import graph has no cycle and no back-edge.

use std::collections::BTreeSet;
use std::path::Path;

/// Bottom to top; a module may use the layers before its own.
const LAYERS: &[&[&str]] = &[
    &["secret"],
    &["model"],
    &["db", "metrics"],
    &["config"],
    &["cli", "crm", "reconcile"],
    &["tokens"],
    &["context", "failure"],
    &["apply"],
    &["funnel", "leads", "oauth"],
    &["logging", "server", "watch"],
    &["daemon"],
    &["commands"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level module a file of `src/` belongs to (`None` for the crate root).
fn module_of(path: &Path, src: &Path) -> Option<String> {
    let relative = path.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let module = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(module, "lib" | "main")).then(|| module.to_string())
}

fn rust_files(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The modules `text` names as `crate::NAME`.
fn uses(text: &str) -> BTreeSet<String> {
    text.match_indices("crate::")
        .map(|(i, m)| {
            let rest = &text[i + m.len()..];
            rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

#[test]
fn every_module_uses_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "the source tree was not found: {files:?}");
    let mut violations = Vec::new();
    let mut modules = BTreeSet::new();
    for file in &files {
        let Some(module) = module_of(file, &src) else { continue };
        let Some(own) = layer(&module) else {
            violations.push(format!("{module} ({}) is in no layer", file.display()));
            continue;
        };
        modules.insert(module.clone());
        let text = std::fs::read_to_string(file).expect("a source file is readable");
        for used in uses(&text).into_iter().filter(|used| *used != module) {
            match layer(&used) {
                Some(theirs) if theirs < own => {}
                _ => violations.push(format!("{} uses crate::{used}", file.display())),
            }
        }
    }
    assert!(modules.len() > 15, "too few modules found: {modules:?}");
    assert!(violations.is_empty(), "layering broken:\n{}", violations.join("\n"));
}

#[test]
fn the_check_sees_an_import_from_above() {
    assert_eq!(uses("use crate::daemon::Hooks; crate::db::X"), BTreeSet::from(["daemon".into(), "db".into()]));
    assert!(layer("daemon") > layer("db"));
    assert_eq!(layer("nowhere"), None);
}
