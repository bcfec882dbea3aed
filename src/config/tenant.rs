//! One tenant file → a [`TenantConfig`], or every problem it has. The key
//! lists here are the schema: `crm.example.toml` is tested against them.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::de::DeTable;

use super::document::Table;
use super::problem::Problems;
use super::secret_source::read_secret;
use super::stages::{self, read_mapping};
use super::{AmoCrmConfig, Bitrix24Config, CronExpr, LoadOptions, Schedule, TenantConfig};
use super::{funnel, leads};
use crate::model::{AmoAccount, AmoDomain, EntityType, Webhook, is_loopback};
use crate::secret::Secret;

pub const ROOT_KEYS: &[&str] = &["tenant", "schedule", "amocrm", "bitrix24", "leads", "funnel"];
pub const TENANT_KEYS: &[&str] = &["slug", "database_url"];
/// Durations are capped at validation: no arithmetic on them can overflow.
pub(crate) const MAX_TOKEN_REFRESH_MARGIN: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

pub const SCHEDULE_KEYS: &[&str] = &["stage_resync", "token_refresh_margin"];
pub const AMOCRM_KEYS: &[&str] = &[
    "subdomain",
    "domain",
    "client_id",
    "client_secret",
    "redirect_uri",
    "authorization_code",
    "long_lived_token",
    "base_url",
    "test_pipeline_id",
    "stages",
];
pub const BITRIX24_KEYS: &[&str] = &["webhook_url", "entity_type", "test_category_id", "stages"];

/// Every table of a tenant file with its keys: what the readers check
/// unknown keys against, the example is tested against and the JSON Schema
/// (`schema.rs`) is generated from.
pub const SCHEMA: &[(&str, &[&str])] = &[
    ("", ROOT_KEYS),
    ("tenant", TENANT_KEYS),
    ("schedule", SCHEDULE_KEYS),
    ("amocrm", AMOCRM_KEYS),
    ("amocrm.stages", stages::MAPPING_KEYS),
    ("bitrix24", BITRIX24_KEYS),
    ("bitrix24.stages", stages::MAPPING_KEYS),
    ("leads", leads::LEADS_KEYS),
    ("leads.amocrm", leads::LEADS_AMOCRM_KEYS),
    ("leads.bitrix24", leads::LEADS_BITRIX24_KEYS),
    ("funnel", funnel::FUNNEL_KEYS),
];

pub const DEFAULT_STAGE_RESYNC: &str = "*/15 * * * *";
pub const DEFAULT_TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(3600);

/// Reads a parsed tenant file. Returns a tenant only if no error was found.
pub(crate) fn read_tenant(
    file: &Path,
    doc: &toml::Spanned<DeTable>,
    options: &LoadOptions,
    problems: &mut Problems,
) -> (Option<Slug>, Option<TenantConfig>) {
    let dir = file.parent().unwrap_or(Path::new("."));
    let root = Table::root(doc);
    root.check_keys(ROOT_KEYS, problems);

    let tenant = root.table("tenant", "tenant", problems);
    if let Some(t) = &tenant {
        t.check_keys(TENANT_KEYS, problems);
    }
    let slug = read_slug(file, tenant.as_ref(), problems);
    let database_url =
        read_database_url(tenant.as_ref(), slug.as_ref().map(|(s, _)| s.as_str()), dir, options, problems);
    let schedule = read_schedule(root.table("schedule", "schedule", problems), problems);
    let amocrm = root.table("amocrm", "amocrm", problems).and_then(|t| read_amocrm(&t, dir, options, problems));
    let bitrix24 = root.table("bitrix24", "bitrix24", problems).and_then(|t| read_bitrix24(&t, dir, options, problems));
    let leads = leads::read_leads(&root, problems);
    let funnel = funnel::read_funnel(&root, problems);

    if root.get("amocrm").is_none() && root.get("bitrix24").is_none() {
        problems.warning(None, "the tenant has neither [amocrm] nor [bitrix24]: only its database will be migrated");
    }
    if problems.has_errors() {
        return (slug, None);
    }
    let (Some(slug), Some(database_url), Some(schedule)) = (slug, database_url, schedule) else {
        return (None, None);
    };
    let config = TenantConfig {
        slug: slug.0.clone(),
        file: file.to_path_buf(),
        database_url,
        schedule,
        amocrm,
        bitrix24,
        leads,
        funnel,
    };
    (Some(slug), Some(config))
}

/// A slug, with its span when the file sets it (not derived from the name).
pub(crate) type Slug = (String, Option<Range<usize>>);

fn read_slug(file: &Path, tenant: Option<&Table>, problems: &mut Problems) -> Option<Slug> {
    if let Some(slug) = tenant.and_then(|t| t.str("slug", problems)) {
        if valid_slug(slug.get_ref()) {
            return Some((slug.get_ref().to_string(), Some(slug.span())));
        }
        problems.error(Some(slug.span()), format!("`tenant.slug` {:?} must match {SLUG_PATTERN}", slug.get_ref()));
        return None;
    }
    if tenant.is_some_and(|t| t.get("slug").is_some()) {
        return None; // wrong type, already reported
    }
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    if valid_slug(stem) {
        return Some((stem.to_string(), None));
    }
    problems.error(
        None,
        format!("the file name {stem:?} is not a valid slug ({SLUG_PATTERN}): rename the file or set `tenant.slug`"),
    );
    None
}

/// What `valid_slug` accepts, as a regular expression for messages and the schema.
pub(crate) const SLUG_PATTERN: &str = "^[a-z0-9][a-z0-9_]{0,47}$";

pub(crate) fn valid_slug(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.len() <= 48
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn read_database_url(
    tenant: Option<&Table>,
    slug: Option<&str>,
    dir: &Path,
    options: &LoadOptions,
    problems: &mut Problems,
) -> Option<Secret> {
    let explicit = tenant.and_then(|t| read_secret(t, "database_url", dir, &options.env, problems));
    let (url, span) = match explicit {
        Some(url) => {
            let span = url.span();
            (url.into_inner(), Some(span))
        }
        None if tenant.is_some_and(|t| t.get("database_url").is_some()) => return None,
        None => (Secret::new(options.database_url_template.expose().replace("{slug}", slug?)), None),
    };
    if let Err(problem) = crate::db::tls::parse(url.expose()) {
        let source = if span.is_some() { "`tenant.database_url`" } else { "the database URL template" };
        problems.error(
            span,
            format!("{source} is not a valid PostgreSQL URL (postgresql://USER@HOST:PORT/DATABASE): {problem}"),
        );
        return None;
    }
    Some(url)
}

fn read_schedule(table: Option<Table>, problems: &mut Problems) -> Option<Schedule> {
    if let Some(t) = &table {
        t.check_keys(SCHEDULE_KEYS, problems);
    }
    let cron = match table.as_ref().and_then(|t| t.str("stage_resync", problems)) {
        Some(expr) => CronExpr::parse(expr.get_ref()).map_err(|why| {
            problems.error(
                Some(expr.span()),
                format!("`schedule.stage_resync` {:?} is not a valid cron expression: {why}", expr.get_ref()),
            );
        }),
        None => Ok(CronExpr::parse(DEFAULT_STAGE_RESYNC).expect("the default cron expression parses")),
    };
    let margin = match table.as_ref().and_then(|t| t.str("token_refresh_margin", problems)) {
        Some(text) => match humantime::parse_duration(text.get_ref()) {
            Ok(d) if d > MAX_TOKEN_REFRESH_MARGIN => {
                problems.error(
                    Some(text.span()),
                    "`schedule.token_refresh_margin` must be at most 30 days (a refresh token lives 3 months)",
                );
                None
            }
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                problems.error(Some(text.span()), "`schedule.token_refresh_margin` must be longer than zero");
                None
            }
            Err(e) => {
                let what = text.get_ref();
                let message = format!(
                    "`schedule.token_refresh_margin` {what:?} is not a duration like \"15s\", \"10m\" or \"1h\": {e}"
                );
                problems.error(Some(text.span()), message);
                None
            }
        },
        None => Some(DEFAULT_TOKEN_REFRESH_MARGIN),
    };
    Some(Schedule { stage_resync: cron.ok()?, token_refresh_margin: margin? })
}

fn read_amocrm(t: &Table, dir: &Path, options: &LoadOptions, problems: &mut Problems) -> Option<AmoCrmConfig> {
    t.check_keys(AMOCRM_KEYS, problems);
    let secret = |key: &str, problems: &mut Problems| read_secret(t, key, dir, &options.env, problems);

    let subdomain = required(t, "subdomain", problems).and_then(|s| {
        let value = s.get_ref().trim();
        if value.contains('.') || value.contains('/') {
            problems.error(Some(s.span()), "`amocrm.subdomain` is the part before .amocrm.ru (\"acme\" for acme.amocrm.ru), not a host name or URL");
            None
        } else if value.is_empty() || !value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            problems.error(Some(s.span()), "`amocrm.subdomain` may contain only letters, digits and hyphens");
            None
        } else {
            Some(value.to_ascii_lowercase())
        }
    });
    let domain = match t.str("domain", problems) {
        None => Some(AmoDomain::AmocrmRu),
        Some(d) => AmoDomain::parse(d.get_ref()).or_else(|| {
            let known: Vec<&str> = AmoDomain::ALL.iter().map(|d| d.as_str()).collect();
            problems
                .error(Some(d.span()), format!("`amocrm.domain` {:?} is not one of {}", d.get_ref(), known.join(", ")));
            None
        }),
    };
    let authorization_code = secret("authorization_code", problems);
    let long_lived_token = secret("long_lived_token", problems);
    if let (Some(_), Some(token)) = (t.get("authorization_code"), t.get("long_lived_token")) {
        problems.error(
            Some(token.span()),
            "`amocrm.authorization_code` and `amocrm.long_lived_token` exclude each other: keep one",
        );
    }
    // The code flow and every refresh need the integration's credentials; a
    // long-lived token is used as it is.
    let needs_client = t.get("long_lived_token").is_none();
    let client_id = if needs_client { required(t, "client_id", problems) } else { t.str("client_id", problems) };
    let client_secret = secret("client_secret", problems);
    if needs_client && t.get("client_secret").is_none() {
        problems.error(Some(t.span()), "`amocrm.client_secret` is missing");
    }
    let redirect_uri =
        if needs_client { required(t, "redirect_uri", problems) } else { t.str("redirect_uri", problems) };
    if let Some(uri) = &redirect_uri
        && !matches!(url::Url::parse(uri.get_ref()), Ok(u) if u.scheme() == "https" || u.scheme() == "http")
    {
        problems.error(
            Some(uri.span()),
            "`amocrm.redirect_uri` must be an absolute http(s) URL, exactly as in the integration's settings",
        );
    }
    let base_url = t.str("base_url", problems).and_then(|b| match url::Url::parse(b.get_ref()) {
        Ok(u) if u.scheme() == "https" || (u.scheme() == "http" && u.host_str().is_some_and(is_loopback)) => Some(u),
        _ => {
            problems
                .error(Some(b.span()), "`amocrm.base_url` must be an https URL (plain http only for loopback hosts)");
            None
        }
    });
    let test_pipeline_id = t.int("test_pipeline_id", problems).map(|i| i.into_inner());
    if t.get("authorization_code").is_none() && t.get("long_lived_token").is_none() {
        problems.warning(
            Some(t.span()),
            "[amocrm] has neither `authorization_code` nor `long_lived_token`: it stays \"needs authorization\" unless tokens are already stored",
        );
    }
    let stages = read_mapping(t.table("stages", "amocrm.stages", problems), problems);
    Some(AmoCrmConfig {
        account: AmoAccount::new(subdomain?, domain?, base_url.as_ref()),
        client_id: client_id.map(|c| c.into_inner().to_string()),
        client_secret: client_secret.map(|s| s.into_inner()),
        redirect_uri: redirect_uri.map(|r| r.into_inner().to_string()),
        authorization_code: authorization_code.map(|s| s.into_inner()),
        long_lived_token: long_lived_token.map(|s| s.into_inner()),
        test_pipeline_id,
        stages,
    })
}

fn read_bitrix24(t: &Table, dir: &Path, options: &LoadOptions, problems: &mut Problems) -> Option<Bitrix24Config> {
    t.check_keys(BITRIX24_KEYS, problems);
    let webhook = match read_secret(t, "webhook_url", dir, &options.env, problems) {
        Some(url) => Webhook::parse(url.get_ref().expose())
            .map_err(|why| problems.error(Some(url.span()), format!("`bitrix24.webhook_url` {why}")))
            .ok(),
        None => {
            if t.get("webhook_url").is_none() {
                problems.error(Some(t.span()), "`bitrix24.webhook_url` is missing");
            }
            None
        }
    };
    let entity_type = match t.str("entity_type", problems) {
        None => Some(EntityType::Deal),
        Some(e) => EntityType::parse(e.get_ref()).or_else(|| {
            problems
                .error(Some(e.span()), format!("`bitrix24.entity_type` {:?} is not one of deal, lead", e.get_ref()));
            None
        }),
    };
    let test_category_id = t.int("test_category_id", problems).map(|i| i.into_inner());
    let stages = read_mapping(t.table("stages", "bitrix24.stages", problems), problems);
    Some(Bitrix24Config { webhook: webhook?, entity_type: entity_type?, test_category_id, stages })
}

fn required<'t>(t: &Table<'t, '_>, key: &str, problems: &mut Problems) -> Option<toml::Spanned<&'t str>> {
    if t.get(key).is_none() {
        problems.error(Some(t.span()), format!("`{}` is missing", t.path(key)));
        return None;
    }
    t.str(key, problems)
}

impl CronExpr {
    /// Accepts 5 fields (crontab) or 6 (seconds first), checked by the same
    /// parser and options the scheduler uses.
    pub fn parse(source: &str) -> Result<CronExpr, String> {
        let fields = source.split_whitespace().count();
        let with_seconds = match fields {
            5 => format!("0 {}", source.trim()),
            6 => source.trim().to_string(),
            n => return Err(format!("expected 5 fields (or 6 with seconds first), found {n}")),
        };
        let cron = cron_parser().parse(&with_seconds).map_err(|e| e.to_string())?;
        // "0 0 31 2 *" parses but would never fire: a schedule that stalls silently.
        cron.find_next_occurrence(&chrono::Utc::now(), false).map_err(|_| "it never fires".to_string())?;
        Ok(CronExpr { source: source.trim().to_string(), with_seconds })
    }

    /// The time between the last run at or before `now` and the next run
    /// after it (UTC, as the scheduler runs it): how old the last sync may
    /// grow at this moment while every run succeeds. Runs need not be evenly
    /// spaced (weekdays only, say), so the answer depends on `now`.
    pub fn interval_at(&self, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
        let cron = cron_parser().parse(&self.with_seconds).ok()?;
        let last = cron.find_previous_occurrence(&now, true).ok()?;
        let next = cron.find_next_occurrence(&now, false).ok()?;
        next.signed_duration_since(last).to_std().ok()
    }
}

/// The parser and options the scheduler uses.
fn cron_parser() -> croner::parser::CronParser {
    croner::parser::CronParser::builder().seconds(croner::parser::Seconds::Required).dom_and_dow(true).build()
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn a_schedule_interval_is_the_gap_between_the_runs_around_now() {
        let at =
            |d: u32, h: u32, m: u32| chrono::Utc.with_ymd_and_hms(2026, 3, d, h, m, 0).single().expect("a valid time");
        let interval = |expr: &str, now| CronExpr::parse(expr).expect("a valid expression").interval_at(now);
        assert_eq!(interval("*/15 * * * *", at(6, 10, 7)), Some(Duration::from_secs(900)));
        assert_eq!(interval("*/15 * * * *", at(6, 10, 15)), Some(Duration::from_secs(900)));
        assert_eq!(interval("*/10 * * * * *", at(6, 10, 7)), Some(Duration::from_secs(10)));
        // 2026-03-06 is a Friday: before its run, Thursday's and Friday's
        // are around; from its run until Monday's, Friday's and Monday's.
        let weekdays = "0 9 * * 1-5";
        assert_eq!(interval(weekdays, at(6, 8, 0)), Some(Duration::from_secs(86_400)));
        assert_eq!(interval(weekdays, at(6, 9, 0)), Some(Duration::from_secs(3 * 86_400)));
        assert_eq!(interval(weekdays, at(8, 12, 0)), Some(Duration::from_secs(3 * 86_400)));
        assert_eq!(interval(weekdays, at(9, 9, 0)), Some(Duration::from_secs(86_400)));
    }
}
