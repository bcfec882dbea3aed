//! Reading a parsed TOML document with its spans: typed getters that report
//! a wrong type or an unknown key (with a did-you-mean) and carry on, so that
//! one pass finds every problem of a file.

use std::ops::Range;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::problem::Problems;

pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// One TOML table (or inline table) and its dotted name, e.g. `amocrm.stages`.
#[derive(Clone)]
pub(crate) struct Table<'t, 'i> {
    pub(crate) name: &'t str,
    pub(crate) table: &'t DeTable<'i>,
    pub(crate) span: Range<usize>,
}

impl<'t, 'i> Table<'t, 'i> {
    pub(crate) fn root(table: &'t Spanned<DeTable<'i>>) -> Self {
        Table { name: "", table: table.get_ref(), span: table.span() }
    }

    /// The dotted name of one of this table's keys, for messages.
    pub(crate) fn path(&self, key: &str) -> String {
        if self.name.is_empty() { key.to_string() } else { format!("{}.{key}", self.name) }
    }

    pub(crate) fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    /// Reports every key not in `known`, suggesting the closest known one.
    pub(crate) fn check_keys(&self, known: &[&str], problems: &mut Problems) {
        for (key, _) in self.table.iter() {
            let name = key.get_ref().as_ref();
            if known.contains(&name) {
                continue;
            }
            let mut message = format!("unknown key `{}`", self.path(name));
            match did_you_mean(name, known) {
                Some(close) => message.push_str(&format!(", did you mean `{close}`?")),
                None => message.push_str(&format!(", expected one of: {}", known.join(", "))),
            }
            problems.error(Some(key.span()), message);
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'t Value<'i>> {
        self.table.get(key)
    }

    pub(crate) fn str(&self, key: &str, problems: &mut Problems) -> Option<Spanned<&'t str>> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::String(s) => Some(Spanned::new(value.span(), s.as_ref())),
            other => {
                problems.error(Some(value.span()), wrong_type(&self.path(key), "a string", other));
                None
            }
        }
    }

    pub(crate) fn int(&self, key: &str, problems: &mut Problems) -> Option<Spanned<i64>> {
        let value = self.get(key)?;
        match as_i64(value.get_ref()) {
            Some(Ok(n)) => Some(Spanned::new(value.span(), n)),
            Some(Err(())) => {
                problems.error(Some(value.span()), format!("`{}` is out of range", self.path(key)));
                None
            }
            None => {
                problems.error(Some(value.span()), wrong_type(&self.path(key), "an integer", value.get_ref()));
                None
            }
        }
    }

    pub(crate) fn array(&self, key: &str, problems: &mut Problems) -> Option<&'t [Value<'i>]> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::Array(items) => Some(items.as_ref()),
            other => {
                problems.error(Some(value.span()), wrong_type(&self.path(key), "an array", other));
                None
            }
        }
    }

    /// A sub-table; `name` is its dotted name for messages.
    pub(crate) fn table(&self, key: &str, name: &'t str, problems: &mut Problems) -> Option<Table<'t, 'i>> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::Table(table) => Some(Table { name, table, span: value.span() }),
            other => {
                problems.error(Some(value.span()), wrong_type(name, "a table", other));
                None
            }
        }
    }
}

/// The longest poll interval: capped so that no timer arithmetic on it can
/// overflow (a wake-up or a one-shot command covers anything sooner).
pub(crate) const MAX_POLL: Duration = Duration::from_secs(86_400);

/// A poll interval at `key` (`"30s"`, `"1m"`): `default` when absent, at
/// least `min` and at most a day; `None` when wrong (reported).
pub(crate) fn read_poll(
    t: &Table,
    key: &str,
    default: Duration,
    min: Duration,
    problems: &mut Problems,
) -> Option<Duration> {
    let Some(text) = t.str(key, problems) else {
        return t.get(key).is_none().then_some(default);
    };
    let path = t.path(key);
    let message = match humantime::parse_duration(text.get_ref()) {
        Ok(d) if (min..=MAX_POLL).contains(&d) => return Some(d),
        Ok(d) if d < min => format!("`{path}` must be at least {}", humantime::format_duration(min)),
        Ok(_) => format!("`{path}` must be at most 1 day"),
        Err(e) => format!("`{path}` {:?} is not a duration like \"30s\", \"1m\" or \"5m\": {e}", text.get_ref()),
    };
    problems.error(Some(text.span()), message);
    None
}

/// An integer value, or `Some(Err)` when it does not fit an i64.
pub(crate) fn as_i64(value: &DeValue<'_>) -> Option<Result<i64, ()>> {
    let int = value.as_integer()?;
    Some(i64::from_str_radix(int.as_str(), int.radix()).map_err(|_| ()))
}

pub(crate) fn wrong_type(path: &str, expected: &str, found: &DeValue<'_>) -> String {
    format!("`{path}` must be {expected}, found {}", found.type_str())
}

/// The dotted path of the innermost key whose name or value holds the byte
/// at `offset`: what a problem reported there is about. An array ends the
/// path (an item of `amocrm.stages.fail` is `amocrm.stages.fail`).
pub(crate) fn key_at(table: &DeTable<'_>, offset: usize) -> Option<String> {
    let mut found = None;
    for (key, value) in table.iter() {
        // A table's own span may be its header alone, so look inside every
        // table, not only the one whose span holds the offset.
        if let DeValue::Table(inner) = value.get_ref()
            && let Some(path) = key_at(inner, offset)
        {
            return Some(format!("{}.{path}", key.get_ref()));
        }
        if key.span().contains(&offset) || value.span().contains(&offset) {
            found = Some(key.get_ref().to_string());
        }
    }
    found
}

/// The closest of `known` to `key`, if any is close enough to be a typo.
pub(crate) fn did_you_mean<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(key, k), *k))
        .filter(|(distance, k)| *distance <= (k.len().max(key.len()) / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::{did_you_mean, key_at};

    #[test]
    fn the_key_at_an_offset_is_the_innermost_one() {
        let text = "[tenant]\nslug = \"a\"\n[amocrm]\nsubdomain = \"x\"\n[amocrm.stages]\nfail = [1, { pipeline = \"p\" }]\n[leads.amocrm]\nstage = { pipeline = \"p\", stage = \"s\" }\n";
        let doc = toml::de::DeTable::parse(text).unwrap();
        let at = |needle: &str| key_at(doc.get_ref(), text.find(needle).unwrap());
        assert_eq!(at("slug"), Some("tenant.slug".into()));
        assert_eq!(at("\"a\""), Some("tenant.slug".into()));
        assert_eq!(at("[amocrm]"), Some("amocrm".into()));
        assert_eq!(at("subdomain"), Some("amocrm.subdomain".into()));
        assert_eq!(at("{ pipeline = \"p\" }"), Some("amocrm.stages.fail".into()), "arrays end the path");
        assert_eq!(at("[leads.amocrm]"), Some("leads.amocrm".into()));
        assert_eq!(at("stage = {"), Some("leads.amocrm.stage".into()));
        assert_eq!(at("stage = \"s\""), Some("leads.amocrm.stage.stage".into()));
        assert_eq!(key_at(doc.get_ref(), text.len() + 10), None);
    }

    #[test]
    fn suggestions_catch_typos_only() {
        let known = ["client_id", "client_secret", "subdomain", "domain"];
        assert_eq!(did_you_mean("clinet_id", &known), Some("client_id"));
        assert_eq!(did_you_mean("subdomian", &known), Some("subdomain"));
        assert_eq!(did_you_mean("domains", &known), Some("domain"));
        assert_eq!(did_you_mean("webhook_url", &known), None);
    }
}
