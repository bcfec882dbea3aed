//! `crm-connect stages --tenant SLUG`: the synced pipelines and stages with
//! their ids and flags, read from the tenant's database.

use std::process::ExitCode;

use crate::cli::{GlobalArgs, TenantArg};
use crate::db::{self, Pools};
use crate::model::EntityType;

pub async fn run(global: &GlobalArgs, args: &TenantArg) -> ExitCode {
    let tenant = match super::load_tenant(global, &args.tenant) {
        Ok(tenant) => tenant,
        Err(message) => {
            eprintln!("crm-connect: {message}");
            return ExitCode::FAILURE;
        }
    };
    let pools = Pools::new(global.pool_settings());
    let result = async {
        // Read-only: no migration. Tables not there yet mean nothing synced yet.
        let db = pools.get(&tenant.slug, &tenant.database_url)?;
        let session = db.session().await?;
        let amocrm = match db::amocrm_stages::read(&session).await {
            Err(e) if e.is_missing_schema() => return Ok((Vec::new(), Vec::new())),
            other => other?,
        };
        let entity = tenant.bitrix24.as_ref().map_or(EntityType::Deal, |b| b.entity_type);
        let bitrix24 = db::bitrix24_stages::read(&session, entity).await?;
        Ok::<_, db::DbError>((amocrm, bitrix24))
    }
    .await;
    let (amocrm, bitrix24) = match result {
        Ok(stages) => stages,
        Err(e) => {
            eprintln!("crm-connect: {e}");
            return ExitCode::FAILURE;
        }
    };
    if tenant.amocrm.is_some() || !amocrm.is_empty() {
        println!("AmoCRM");
        let rows: Vec<[String; 5]> = amocrm
            .iter()
            .map(|s| {
                let main = if s.row.pipeline_is_main { " (main)" } else { "" };
                [
                    format!("{}{main}", s.row.pipeline_name),
                    s.row.pipeline_id.to_string(),
                    s.row.status_name.clone(),
                    s.row.status_id.to_string(),
                    flags(s.flags, s.removed),
                ]
            })
            .collect();
        print_columns(&["PIPELINE", "PIPELINE ID", "STAGE", "STATUS ID", "FLAGS"], &rows);
        if amocrm.is_empty() {
            println!("(no stages synced yet: run `crm-connect sync --tenant {}`)", tenant.slug);
        }
    }
    if tenant.bitrix24.is_some() || !bitrix24.is_empty() {
        println!("\nBitrix24");
        let rows: Vec<[String; 5]> = bitrix24
            .iter()
            .map(|s| {
                [
                    s.row.category_name.clone(),
                    s.row.category_id.to_string(),
                    s.row.status_name.clone(),
                    s.row.status_id.clone(),
                    format!("{} {}", s.row.semantics.as_str(), flags(s.flags, s.removed)),
                ]
            })
            .collect();
        print_columns(&["CATEGORY", "CATEGORY ID", "STAGE", "STATUS_ID", "SEMANTICS FLAGS"], &rows);
        if bitrix24.is_empty() {
            println!("(no stages synced yet: run `crm-connect sync --tenant {}`)", tenant.slug);
        }
    }
    ExitCode::SUCCESS
}

fn flags(flags: crate::model::StageFlags, removed: bool) -> String {
    let mut out: Vec<&str> = Vec::new();
    if flags.qualified {
        out.push("qualified");
    }
    if flags.success {
        out.push("success");
    }
    if flags.fail {
        out.push("fail");
    }
    if removed {
        out.push("(removed)");
    }
    if out.is_empty() { "-".into() } else { out.join(" ") }
}

/// Left-aligned columns, padded by character count (Cyrillic names align).
pub(crate) fn print_columns<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> =
            cells.iter().zip(widths).map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count()))).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
