//! Tenant files pointing at the sandboxes, built key by key instead of
//! spelled out as text: `[tenant]`, `[schedule]`, `[amocrm]` with its
//! stages and `[bitrix24]` with its stages, every value quoted for TOML.
//! The demo, the tests and the benchmark all write their files with it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::amocrm::AmoSandbox;
use crate::bitrix24::B24Sandbox;
use crate::files::{replace_file, toml_string};

/// One stage reference of a `[amocrm.stages]` or `[bitrix24.stages]` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stage {
    /// An AmoCRM status id, e.g. 142.
    Id(i64),
    /// A Bitrix24 status id, e.g. `C1:PREPARATION`.
    Status(String),
    /// An AmoCRM status by pipeline and stage name.
    InPipeline { pipeline: String, stage: String },
    /// A Bitrix24 stage by category and stage name.
    InCategory { category: String, stage: String },
}

impl Stage {
    pub fn status(id: &str) -> Stage {
        Stage::Status(id.to_owned())
    }

    pub fn in_pipeline(pipeline: &str, stage: &str) -> Stage {
        Stage::InPipeline { pipeline: pipeline.to_owned(), stage: stage.to_owned() }
    }

    pub fn in_category(category: &str, stage: &str) -> Stage {
        Stage::InCategory { category: category.to_owned(), stage: stage.to_owned() }
    }

    fn toml(&self) -> String {
        match self {
            Stage::Id(id) => id.to_string(),
            Stage::Status(id) => toml_string(id),
            Stage::InPipeline { pipeline, stage } => {
                format!("{{ pipeline = {}, stage = {} }}", toml_string(pipeline), toml_string(stage))
            }
            Stage::InCategory { category, stage } => {
                format!("{{ category = {}, stage = {} }}", toml_string(category), toml_string(stage))
            }
        }
    }
}

/// The keys of one table in the order first set; values are TOML already.
#[derive(Clone, Debug, Default)]
struct Table(Vec<(String, String)>);

impl Table {
    /// A key set again keeps its place, so an override reads like the original.
    fn set(&mut self, key: &str, toml: String) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, value)) => *value = toml,
            None => self.0.push((key.to_owned(), toml)),
        }
    }

    fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    fn render(&self, header: &str) -> String {
        let keys: String = self.0.iter().map(|(key, value)| format!("{key} = {value}\n")).collect();
        format!("[{header}]\n{keys}")
    }
}

/// A CRM table and its `.stages` sub-table.
#[derive(Clone, Debug, Default)]
struct Crm {
    keys: Table,
    stages: Table,
}

impl Crm {
    fn render(&self, name: &str, tables: &mut Vec<String>) {
        tables.push(self.keys.render(name));
        if !self.stages.0.is_empty() {
            tables.push(self.stages.render(&format!("{name}.stages")));
        }
    }
}

/// A tenant file under construction; `text` gives its TOML.
#[derive(Clone, Debug, Default)]
pub struct TenantFile {
    comments: Vec<String>,
    tenant: Table,
    schedule: Table,
    amocrm: Option<Crm>,
    bitrix24: Option<Crm>,
    /// Further tables (`leads`, `leads.amocrm`, …) by header, in order.
    tables: Vec<(String, Table)>,
}

impl TenantFile {
    /// No table at all: a file whose database comes from the URL template.
    pub fn new() -> TenantFile {
        TenantFile::default()
    }

    /// A `# …` line at the top, for whoever opens the file.
    pub fn comment(mut self, text: &str) -> TenantFile {
        self.comments.push(text.to_owned());
        self
    }

    pub fn database_url(mut self, url: &str) -> TenantFile {
        self.tenant.set("database_url", toml_string(url));
        self
    }

    pub fn slug(mut self, slug: &str) -> TenantFile {
        self.tenant.set("slug", toml_string(slug));
        self
    }

    /// A `[schedule]` string, e.g. `token_refresh_margin` or `stage_resync`.
    pub fn schedule(mut self, key: &str, value: &str) -> TenantFile {
        self.schedule.set(key, toml_string(value));
        self
    }

    /// `[amocrm]` for the integration the sandbox plays: its subdomain,
    /// client, redirect URI and base URL.
    pub fn amocrm(mut self, sandbox: &AmoSandbox) -> TenantFile {
        let c = sandbox.config();
        let crm = self.amocrm.get_or_insert_with(Crm::default);
        for (key, value) in [
            ("subdomain", c.subdomain.as_str()),
            ("client_id", &c.client_id),
            ("client_secret", &c.client_secret),
            ("redirect_uri", &c.redirect_uri),
            ("base_url", &sandbox.base_url()),
        ] {
            crm.keys.set(key, toml_string(value));
        }
        self
    }

    pub fn authorization_code(self, code: &str) -> TenantFile {
        self.amocrm_key("authorization_code", &toml_string(code))
    }

    pub fn long_lived_token(self, token: &str) -> TenantFile {
        self.amocrm_key("long_lived_token", &toml_string(token))
    }

    /// Any `[amocrm]` key, `toml` being its value as TOML (a number, an
    /// inline table `{ file = "…" }`, a quoted string).
    pub fn amocrm_key(mut self, key: &str, toml: &str) -> TenantFile {
        self.amocrm.get_or_insert_with(Crm::default).keys.set(key, toml.to_owned());
        self
    }

    /// An `[amocrm]` string key, quoted (an override of the sandbox's
    /// subdomain or client secret, say).
    pub fn amocrm_string(self, key: &str, value: &str) -> TenantFile {
        self.amocrm_key(key, &toml_string(value))
    }

    /// Leaves an `[amocrm]` key out (a long-lived token needs no client).
    pub fn without_amocrm_key(mut self, key: &str) -> TenantFile {
        if let Some(crm) = &mut self.amocrm {
            crm.keys.remove(key);
        }
        self
    }

    /// `[amocrm.stages]`: `flag` (qualified, success, fail) lists `stages`.
    pub fn amocrm_stages(mut self, flag: &str, stages: impl IntoIterator<Item = Stage>) -> TenantFile {
        self.amocrm.get_or_insert_with(Crm::default).stages.set(flag, list(stages));
        self
    }

    /// `[bitrix24]` on the sandbox's inbound webhook.
    pub fn bitrix24(self, sandbox: &B24Sandbox) -> TenantFile {
        self.webhook_url(&sandbox.webhook_url())
    }

    /// `[bitrix24]` on any webhook URL (a wrong code, another portal).
    pub fn webhook_url(self, url: &str) -> TenantFile {
        self.bitrix24_key("webhook_url", &toml_string(url))
    }

    pub fn entity_type(self, entity_type: &str) -> TenantFile {
        self.bitrix24_key("entity_type", &toml_string(entity_type))
    }

    /// Any `[bitrix24]` key, `toml` being its value as TOML.
    pub fn bitrix24_key(mut self, key: &str, toml: &str) -> TenantFile {
        self.bitrix24.get_or_insert_with(Crm::default).keys.set(key, toml.to_owned());
        self
    }

    /// `[bitrix24.stages]`: `flag` (qualified, success, fail) lists `stages`.
    pub fn bitrix24_stages(mut self, flag: &str, stages: impl IntoIterator<Item = Stage>) -> TenantFile {
        self.bitrix24.get_or_insert_with(Crm::default).stages.set(flag, list(stages));
        self
    }

    /// Sets `key` (TOML given as is) in the table `header`, e.g. `leads`
    /// or `leads.amocrm`; the table is added after the CRM tables.
    pub fn table_key(mut self, header: &str, key: &str, toml: &str) -> TenantFile {
        let index = match self.tables.iter().position(|(h, _)| h == header) {
            Some(index) => index,
            None => {
                self.tables.push((header.to_owned(), Table::default()));
                self.tables.len() - 1
            }
        };
        self.tables[index].1.set(key, toml.to_owned());
        self
    }

    pub fn text(&self) -> String {
        let mut tables = Vec::new();
        for (name, table) in [("tenant", &self.tenant), ("schedule", &self.schedule)] {
            if !table.0.is_empty() {
                tables.push(table.render(name));
            }
        }
        for (name, crm) in [("amocrm", &self.amocrm), ("bitrix24", &self.bitrix24)] {
            if let Some(crm) = crm {
                crm.render(name, &mut tables);
            }
        }
        for (header, table) in &self.tables {
            tables.push(table.render(header));
        }
        let comments: String = self.comments.iter().map(|comment| format!("# {comment}\n")).collect();
        format!("{comments}{}", tables.join("\n"))
    }

    /// Writes `<dir>/<slug>.toml`; returns its path.
    pub fn write(&self, dir: &Path, slug: &str) -> io::Result<PathBuf> {
        let path = dir.join(format!("{slug}.toml"));
        std::fs::write(&path, self.text())?;
        Ok(path)
    }

    /// Like `write`, but as editors save: aside, then renamed over, so a
    /// watcher never reads half a file.
    pub fn replace(&self, dir: &Path, slug: &str) -> io::Result<PathBuf> {
        let path = dir.join(format!("{slug}.toml"));
        replace_file(&path, &self.text())?;
        Ok(path)
    }
}

impl fmt::Display for TenantFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

fn list(stages: impl IntoIterator<Item = Stage>) -> String {
    let items: Vec<String> = stages.into_iter().map(|stage| stage.toml()).collect();
    format!("[{}]", items.join(", "))
}
