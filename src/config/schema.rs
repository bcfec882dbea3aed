//! The JSON Schema of a tenant file, for editors (a `#:schema` line) and CI.
//! Generated, never written by hand: its tables and keys are `SCHEMA`, the
//! lists the validator rejects unknown keys with, so a key added to a list
//! is in the schema at once; what each accepts comes from `accepts`.
//! Draft-07 (what TOML language servers read), using only keywords that
//! draft-04 means the same way.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use super::SOURCE_KEYS;
use super::accepts::{Accepts, Described, described};
use super::stages::{AMOCRM_NAME_KEYS, BITRIX24_NAME_KEYS};
use super::tenant::SCHEMA;

pub const DRAFT: &str = "http://json-schema.org/draft-07/schema#";

/// The schema as `crm-connect schema` prints it (and as the repository's
/// `crm-connect.schema.json` holds it), with a final newline.
pub fn json_schema() -> Result<String, serde_json::Error> {
    let described = described();
    let root_keys = SCHEMA.iter().find(|(table, _)| table.is_empty()).map_or(&[][..], |(_, keys)| *keys);
    let mut root = table("", root_keys, &described);
    root.schema = Some(DRAFT);
    root.title = Some("crm-connect tenant file");
    Ok(serde_json::to_string_pretty(&root)? + "\n")
}

/// One schema object; fields in the order they print.
#[derive(Default, serde::Serialize)]
struct Node {
    #[serde(rename = "$schema", skip_serializing_if = "Option::is_none")]
    schema: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(rename = "enum", skip_serializing_if = "Option::is_none")]
    choices: Option<Vec<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    default: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pattern: Option<&'static str>,
    #[serde(rename = "minLength", skip_serializing_if = "Option::is_none")]
    min_length: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    minimum: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    maximum: Option<i64>,
    #[serde(rename = "minProperties", skip_serializing_if = "Option::is_none")]
    min_properties: Option<usize>,
    #[serde(rename = "maxProperties", skip_serializing_if = "Option::is_none")]
    max_properties: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    items: Option<Box<Node>>,
    #[serde(rename = "anyOf", skip_serializing_if = "Option::is_none")]
    any_of: Option<Vec<Node>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<Properties>,
    /// Draft-04 wants at least one name here, so an empty list is left out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    required: Vec<&'static str>,
    #[serde(rename = "additionalProperties", skip_serializing_if = "Option::is_none")]
    additional_properties: Option<bool>,
}

/// Properties in the order of their key list, whatever map serde_json is
/// built with.
struct Properties(Vec<(&'static str, Node)>);

impl Serialize for Properties {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, node) in &self.0 {
            map.serialize_entry(key, node)?;
        }
        map.end()
    }
}

fn join(table: &str, key: &str) -> String {
    if table.is_empty() { key.to_string() } else { format!("{table}.{key}") }
}

/// A table of `SCHEMA`: exactly its keys, each a table of `SCHEMA` in turn
/// or a value as `accepts` describes it.
fn table(path: &str, keys: &'static [&'static str], described: &[Described]) -> Node {
    let about = described.iter().find(|d| d.path == path);
    let mut required = Vec::new();
    let properties = keys
        .iter()
        .map(|key| {
            let child = join(path, key);
            let node = match SCHEMA.iter().find(|(table, _)| *table == child) {
                Some((_, keys)) => table(&child, keys, described),
                None => match described.iter().find(|d| d.path == child) {
                    Some(d) => {
                        if d.required {
                            required.push(*key);
                        }
                        Node { description: Some(d.doc.clone()), default: d.default.clone(), ..value(&d.accepts) }
                    }
                    // Known to the validator but not described: any value,
                    // so that the schema never rejects a key it accepts.
                    None => Node::default(),
                },
            };
            (*key, node)
        })
        .collect();
    Node {
        description: about.map(|d| d.doc.clone()),
        kind: Some("object"),
        properties: Some(Properties(properties)),
        required,
        additional_properties: Some(false),
        ..Node::default()
    }
}

fn value(accepts: &Accepts) -> Node {
    match accepts {
        Accepts::Table => Node { kind: Some("object"), ..Node::default() },
        Accepts::Text => string(None),
        Accepts::NonBlank => string(Some(r"\S")),
        Accepts::Pattern(pattern) => string(Some(pattern)),
        Accepts::OneOf(choices) => Node { choices: Some(choices.clone()), ..string(None) },
        Accepts::Secret => any_of(vec![Node { min_length: Some(1), ..string(None) }, source()]),
        Accepts::Integer { min, max } => Node { minimum: *min, maximum: *max, ..integer() },
        Accepts::IdOrName { min } => any_of(vec![Node { minimum: Some(*min), ..integer() }, string(Some(r"\S"))]),
        Accepts::AmoStage => any_of(vec![Node { minimum: Some(1), ..integer() }, names(AMOCRM_NAME_KEYS)]),
        // A STATUS_ID is one word; the reader trims it.
        Accepts::Bitrix24Stage => any_of(vec![string(Some(r"^\s*\S+\s*$")), names(BITRIX24_NAME_KEYS)]),
        Accepts::List(item) => Node { kind: Some("array"), items: Some(Box::new(value(item))), ..Node::default() },
    }
}

fn string(pattern: Option<&'static str>) -> Node {
    Node { kind: Some("string"), pattern, ..Node::default() }
}

fn integer() -> Node {
    Node { kind: Some("integer"), ..Node::default() }
}

fn any_of(nodes: Vec<Node>) -> Node {
    Node { any_of: Some(nodes), ..Node::default() }
}

/// `{ env = "NAME" }`, `{ file = "path" }` or `{ credential = "name" }`: one of them.
fn source() -> Node {
    Node {
        kind: Some("object"),
        properties: Some(Properties(SOURCE_KEYS.iter().map(|key| (*key, string(None))).collect())),
        min_properties: Some(1),
        max_properties: Some(1),
        additional_properties: Some(false),
        ..Node::default()
    }
}

/// A stage named by its container and its own name, both non-blank.
fn names(keys: &'static [&'static str]) -> Node {
    Node {
        kind: Some("object"),
        properties: Some(Properties(keys.iter().map(|key| (*key, string(Some(r"\S")))).collect())),
        required: keys.to_vec(),
        additional_properties: Some(false),
        ..Node::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every table and key of `SCHEMA` as a dotted path, the root as `""`.
    fn paths() -> BTreeSet<String> {
        let mut paths = BTreeSet::new();
        for (table, keys) in SCHEMA {
            paths.insert(table.to_string());
            paths.extend(keys.iter().map(|key| join(table, key)));
        }
        paths
    }

    #[test]
    fn every_table_and_key_of_the_key_lists_is_described_and_nothing_else() {
        let described = described();
        let documented: BTreeSet<String> = described.iter().map(|d| d.path.to_string()).collect();
        let paths = paths();
        let undescribed: Vec<&String> = paths.difference(&documented).collect();
        let unknown: Vec<&String> = documented.difference(&paths).collect();
        assert!(undescribed.is_empty(), "add these to config::accepts::described(): {undescribed:?}");
        assert!(unknown.is_empty(), "described, but in no key list of config::SCHEMA: {unknown:?}");
        for d in &described {
            let is_table = SCHEMA.iter().any(|(table, _)| *table == d.path);
            assert_eq!(d.accepts == Accepts::Table, is_table, "`{}`: a table iff SCHEMA lists its keys", d.path);
            assert_eq!(described.iter().filter(|other| other.path == d.path).count(), 1, "`{}` twice", d.path);
        }
        assert!(paths.len() > 40, "only {} paths", paths.len());
    }

    #[test]
    fn every_key_list_is_a_closed_object_of_the_schema() {
        let schema: Value = serde_json::from_str(&json_schema().unwrap()).unwrap();
        assert_eq!(schema["$schema"], DRAFT);
        for (table, keys) in SCHEMA {
            let mut node = &schema;
            for segment in table.split('.').filter(|s| !s.is_empty()) {
                node = &node["properties"][segment];
            }
            assert_eq!(node["type"], "object", "`{table}`");
            assert_eq!(node["additionalProperties"], false, "`{table}`");
            let properties: Vec<&str> = node["properties"].as_object().unwrap().keys().map(String::as_str).collect();
            let mut expected = keys.to_vec();
            let mut actual = properties.clone();
            expected.sort_unstable();
            actual.sort_unstable();
            assert_eq!(actual, expected, "`{table}`");
            for key in *keys {
                assert!(
                    node["properties"][key]["description"].is_string(),
                    "`{}` has no description",
                    join(table, key)
                );
            }
        }
    }
}
