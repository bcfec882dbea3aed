//! Tenant configuration: finding the files, reading and validating them
//! (every problem, with its position), and the typed model the rest of the
//! program works from. No network and no database here.

mod accepts;
mod document;
mod files;
mod funnel;
mod leads;
mod problem;
mod schema;
mod secret_source;
mod stages;
mod tenant;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest;

pub use files::is_tenant_file;
pub use funnel::{DEFAULT_FUNNEL_POLL, FunnelConfig};
pub use leads::{
    AmoLeadDefaults, B24LeadDefaults, DEFAULT_KEY_FIELD_NAME, DEFAULT_LEADS_POLL, DEFAULT_MAX_ATTEMPTS, LeadsConfig,
    PipelineRef,
};
pub use problem::{Problem, Severity};
pub use schema::json_schema;
pub use secret_source::{Environment, SOURCE_KEYS};
pub use stages::{AMOCRM_NAME_KEYS, AmoStageRef, BITRIX24_NAME_KEYS, Bitrix24StageRef, StageMapping, normalize_name};
pub use tenant::{DEFAULT_STAGE_RESYNC, DEFAULT_TOKEN_REFRESH_MARGIN, SCHEMA};

use crate::model::{AmoAccount, Credentials, Crm, EntityType, MissingCredentials, Stream, Webhook};
use crate::secret::Secret;

pub const DEFAULT_DATABASE_URL_TEMPLATE: &str = "postgresql://postgres@localhost:5432/openclaw_{slug}";

/// One tenant, as its file describes it, validated.
#[derive(Clone, Debug)]
pub struct TenantConfig {
    pub slug: String,
    pub file: PathBuf,
    pub database_url: Secret,
    pub schedule: Schedule,
    pub amocrm: Option<AmoCrmConfig>,
    pub bitrix24: Option<Bitrix24Config>,
    /// `[leads]`: present = deliver the rows of `crm_lead_outbox`.
    pub leads: Option<LeadsConfig>,
    /// `[funnel]`: present = record stage changes in `crm_stage_changes`.
    pub funnel: Option<FunnelConfig>,
}

impl TenantConfig {
    /// The CRMs the file configures.
    pub fn crms(&self) -> Vec<Crm> {
        let configured = [(Crm::AmoCrm, self.amocrm.is_some()), (Crm::Bitrix24, self.bitrix24.is_some())];
        configured.into_iter().filter(|(_, on)| *on).map(|(crm, _)| crm).collect()
    }

    /// The change streams `[funnel]` follows: AmoCRM's one, and one per
    /// Bitrix24 entity. None without `[funnel]`.
    pub fn funnel_streams(&self) -> Vec<Stream> {
        let Some(funnel) = &self.funnel else { return Vec::new() };
        let amocrm = self.amocrm.as_ref().map(|_| Stream::AmoLeadStatusChanged);
        let bitrix24 = self.bitrix24.as_ref().map(|_| funnel.entities.iter().map(|e| Stream::Bitrix24(*e)));
        amocrm.into_iter().chain(bitrix24.into_iter().flatten()).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub stage_resync: CronExpr,
    pub token_refresh_margin: Duration,
}

/// A cron expression as written, and in the 6-field form the scheduler takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CronExpr {
    pub source: String,
    pub with_seconds: String,
}

#[derive(Clone, Debug)]
pub struct AmoCrmConfig {
    /// The subdomain and domain, or `base_url`, with the hosts they give.
    pub account: AmoAccount,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub redirect_uri: Option<String>,
    pub authorization_code: Option<Secret>,
    pub long_lived_token: Option<Secret>,
    pub test_pipeline_id: Option<i64>,
    pub stages: StageMapping<AmoStageRef>,
}

impl AmoCrmConfig {
    /// The three a token request needs; validation asks for them unless
    /// the tenant uses a long-lived token.
    pub fn credentials(&self) -> Result<Credentials<'_>, MissingCredentials> {
        match (&self.client_id, &self.client_secret, &self.redirect_uri) {
            (Some(client_id), Some(client_secret), Some(redirect_uri)) => {
                Ok(Credentials { client_id, client_secret, redirect_uri })
            }
            _ => Err(MissingCredentials),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Bitrix24Config {
    pub webhook: Webhook,
    pub entity_type: EntityType,
    pub test_category_id: Option<i64>,
    pub stages: StageMapping<Bitrix24StageRef>,
}

/// What loading needs besides the files.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub database_url_template: Secret,
    pub env: Environment,
}

impl LoadOptions {
    /// What a run of this process loads with: `--database-url-template`
    /// and the process's own environment. Takes the template rather than
    /// the command line, so that configuration does not depend on the CLI.
    pub fn new(database_url_template: Secret) -> LoadOptions {
        LoadOptions { database_url_template, env: Environment::process() }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions::new(Secret::new(DEFAULT_DATABASE_URL_TEMPLATE))
    }
}

/// The outcome for one file: its tenant if valid, and its problems.
#[derive(Debug)]
pub struct FileReport {
    pub path: PathBuf,
    pub slug: Option<String>,
    /// Where the file sets `tenant.slug`, if it does.
    pub slug_position: Option<(usize, usize)>,
    /// SHA-256 of the file's text: whether it changed since the last read.
    pub digest: Option<[u8; 32]>,
    pub tenant: Option<TenantConfig>,
    pub problems: Vec<Problem>,
}

/// Every file under `--config`, and problems that belong to no single file.
#[derive(Debug, Default)]
pub struct Loaded {
    pub files: Vec<FileReport>,
    pub problems: Vec<Problem>,
}

impl FileReport {
    /// The tenant's slug, or the file's name when the slug is unknown.
    pub fn name(&self) -> String {
        self.slug.clone().unwrap_or_else(|| {
            self.path.file_stem().map_or_else(|| self.path.display().to_string(), |s| s.to_string_lossy().into_owned())
        })
    }
}

impl Loaded {
    pub fn tenants(&self) -> impl Iterator<Item = &TenantConfig> {
        self.files.iter().filter_map(|f| f.tenant.as_ref())
    }

    /// Every problem, the general ones first, then file by file.
    pub fn all_problems(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().chain(self.files.iter().flat_map(|f| f.problems.iter()))
    }

    pub fn is_valid(&self) -> bool {
        !self.all_problems().any(Problem::is_error)
    }
}

/// Loads `--config`: a file, or every `*.toml` directly inside a directory.
/// Never fails as a whole: what cannot be read is reported as a problem.
pub fn load(path: &Path, options: &LoadOptions) -> Loaded {
    load_reusing(path, options, Known::default())
}

/// The valid files as a load found them, by path. A rescan every half
/// minute of a thousand files that did not change then reads and hashes
/// them, and parses none. A load takes the reports it reuses out of it
/// rather than copying them: a copy of every tenant made on each rescan
/// (on whichever blocking thread ran it) and kept until the next one left
/// the allocator's arenas fragmented, and the daemon's memory grew in
/// steps of megabytes.
#[derive(Debug, Default)]
pub struct Known(HashMap<PathBuf, FileReport>);

impl Known {
    pub fn of(files: Vec<FileReport>) -> Known {
        Known(files.into_iter().filter(|f| f.tenant.is_some()).map(|f| (f.path.clone(), f)).collect())
    }

    /// The report of `path` when it was valid with this very text, taken
    /// out. An invalid file is always parsed again: the secret it lacked
    /// may be there now.
    fn take(&mut self, path: &Path, text: &str) -> Option<FileReport> {
        self.0.remove(path).filter(|known| known.digest == Some(digest(text)))
    }
}

/// [`load`], taking each valid file whose text is unchanged from `known`
/// instead of parsing it: what its secret sources give is read again only
/// by a load without it (at start and on SIGHUP).
pub fn load_reusing(path: &Path, options: &LoadOptions, mut known: Known) -> Loaded {
    let mut loaded = Loaded::default();
    let paths = match files::discover(path) {
        Ok(paths) => paths,
        Err(problem) => {
            loaded.problems.push(problem);
            return loaded;
        }
    };
    if paths.is_empty() {
        loaded.problems.push(Problem {
            severity: Severity::Warning,
            file: path.to_path_buf(),
            position: None,
            key: None,
            message: "no tenant files (*.toml) found".into(),
        });
    }
    for file in paths {
        let report = match files::read(&file) {
            Ok(text) => known.take(&file, &text).unwrap_or_else(|| parse_file(&file, &text, options)),
            Err(problem) => FileReport {
                path: file,
                slug: None,
                slug_position: None,
                digest: None,
                tenant: None,
                problems: vec![problem],
            },
        };
        loaded.files.push(report);
    }
    reject_duplicate_slugs(&mut loaded.files);
    loaded
}

/// Reads one tenant file's text. Never panics, whatever the input.
pub fn parse_file(path: &Path, text: &str, options: &LoadOptions) -> FileReport {
    let mut problems = problem::Problems::new(path, text);
    let (doc, syntax_errors) = toml::de::DeTable::parse_recoverable(text);
    let parsed = syntax_errors.is_empty();
    let (slug, tenant) = if parsed {
        tenant::read_tenant(path, &doc, options, &mut problems)
    } else {
        // A recovered document is a guess; checking it would report
        // problems the user did not make.
        for e in syntax_errors {
            problems.error(e.span(), format!("TOML syntax: {}", e.message()));
        }
        (None, None)
    };
    let mut problems = problems.into_list(parsed.then(|| doc.get_ref()));
    // In reading order; problems without a position (the file as a whole) last.
    problems.sort_by_key(|p| p.position.unwrap_or((usize::MAX, 0)));
    let slug_position = slug.as_ref().and_then(|(_, span)| span.as_ref()).map(|s| problem::position(text, s.start));
    let digest = Some(digest(text));
    FileReport { path: path.to_path_buf(), slug: slug.map(|(s, _)| s), slug_position, digest, tenant, problems }
}

fn digest(text: &str) -> [u8; 32] {
    sha2::Sha256::digest(text.as_bytes()).into()
}

fn reject_duplicate_slugs(files: &mut [FileReport]) {
    let mut by_slug: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, file) in files.iter().enumerate() {
        if let Some(slug) = &file.slug {
            by_slug.entry(slug.as_str()).or_default().push(i);
        }
    }
    let others: Vec<Vec<String>> = files
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let same = file.slug.as_deref().and_then(|slug| by_slug.get(slug)).map_or(&[][..], |v| &v[..]);
            same.iter().filter(|&&j| j != i).map(|&j| files[j].path.display().to_string()).collect()
        })
        .collect();
    for (file, others) in files.iter_mut().zip(others) {
        if others.is_empty() {
            continue;
        }
        file.tenant = None;
        file.problems.push(Problem {
            severity: Severity::Error,
            file: file.path.clone(),
            position: file.slug_position,
            key: file.slug_position.map(|_| "tenant.slug".to_string()),
            message: format!(
                "slug `{}` is also used by {}; each tenant needs a file of its own",
                file.slug.as_deref().unwrap_or_default(),
                others.join(", ")
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant_file(slug: &str, url: &str) -> String {
        format!("[tenant]\nslug = \"{slug}\"\ndatabase_url = \"{url}\"\n")
    }

    #[test]
    fn a_rescan_takes_a_valid_unchanged_file_as_known_and_parses_the_others_again() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (same, changed, invalid) =
            (dir.path().join("same.toml"), dir.path().join("changed.toml"), dir.path().join("invalid.toml"));
        std::fs::write(&same, tenant_file("same", "postgresql://localhost/same")).expect("written");
        std::fs::write(&changed, tenant_file("changed", "postgresql://localhost/changed")).expect("written");
        std::fs::write(&invalid, "[tenant]\nslug = \"invalid\"\nnot_a_key = 1\n").expect("written");
        let options = LoadOptions::default();
        let first = load(dir.path(), &options);
        assert_eq!(first.files.iter().filter(|f| f.tenant.is_some()).count(), 2, "{first:?}");

        // What is known of `same` differs from its text's meaning, so that
        // taking it rather than parsing shows.
        let mut known = Known::of(first.files);
        for report in known.0.values_mut() {
            if let Some(tenant) = report.tenant.as_mut() {
                tenant.slug = format!("{}-as-known", tenant.slug);
            }
        }
        std::fs::write(&changed, tenant_file("changed", "postgresql://localhost/other")).expect("written");
        std::fs::write(&invalid, tenant_file("invalid", "postgresql://localhost/invalid")).expect("written");
        let again = load_reusing(dir.path(), &options, known);

        let slugs: Vec<&str> = again.files.iter().filter_map(|f| f.tenant.as_ref()).map(|t| t.slug.as_str()).collect();
        assert_eq!(slugs, ["changed", "invalid", "same-as-known"]);
    }
}
