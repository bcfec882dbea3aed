//! A problem found in a configuration file: an error or a warning, with its
//! `file:line:column` when it has one. Messages never contain secret values.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::DeTable;

use super::document::key_at;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub file: PathBuf,
    /// 1-based line and column (in characters).
    pub position: Option<(usize, usize)>,
    /// The dotted path of the key (or table) at `position`, e.g.
    /// `amocrm.client_id`; `None` for the file as a whole and for syntax
    /// errors, whose document is not trusted.
    pub key: Option<String>,
    pub message: String,
}

impl Problem {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = self.severity.as_str();
        match self.position {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {severity}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {severity}: {}", self.file.display(), self.message),
        }
    }
}

/// Collects the problems of one file and turns byte spans into positions
/// and, once the file is read, into the keys they point at.
pub(crate) struct Problems<'a> {
    file: &'a Path,
    text: &'a str,
    list: Vec<Problem>,
    /// Where each problem of `list` starts, as a byte offset.
    offsets: Vec<Option<usize>>,
}

impl<'a> Problems<'a> {
    pub(crate) fn new(file: &'a Path, text: &'a str) -> Self {
        Problems { file, text, list: Vec::new(), offsets: Vec::new() }
    }

    pub(crate) fn error(&mut self, span: Option<Range<usize>>, message: impl Into<String>) {
        self.push(Severity::Error, span, message.into());
    }

    pub(crate) fn warning(&mut self, span: Option<Range<usize>>, message: impl Into<String>) {
        self.push(Severity::Warning, span, message.into());
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.list.iter().any(Problem::is_error)
    }

    fn push(&mut self, severity: Severity, span: Option<Range<usize>>, message: String) {
        let position = span.as_ref().map(|s| position(self.text, s.start));
        self.offsets.push(span.map(|s| s.start));
        self.list.push(Problem { severity, file: self.file.to_path_buf(), position, key: None, message });
    }

    /// The problems, each with the key at its position in `document` (the
    /// file as read; `None` when it could not be parsed).
    pub(crate) fn into_list(self, document: Option<&DeTable<'_>>) -> Vec<Problem> {
        let mut list = self.list;
        if let Some(document) = document {
            for (problem, offset) in list.iter_mut().zip(self.offsets) {
                problem.key = offset.and_then(|offset| key_at(document, offset));
            }
        }
        list
    }
}

/// 1-based line and column of a byte offset; the column counts characters so
/// that Cyrillic text points where an editor does.
pub(crate) fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..offset].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::position;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let text = "a = 1\nимя = 2\n";
        assert_eq!(position(text, 0), (1, 1));
        assert_eq!(position(text, 6), (2, 1));
        assert_eq!(position(text, text.find('=').unwrap()), (1, 3));
        let second_eq = text.rfind('=').unwrap();
        assert_eq!(position(text, second_eq), (2, 5));
        assert_eq!(position(text, 10_000), (3, 1));
        assert_eq!(position(text, 7), (2, 1), "inside a character rounds down");
    }
}
