//! Every pipeline with its stages: the category list, then each
//! category's stages in `batch`es, every page a list promises read, and
//! the wire rows read leniently into model stages. A list is whole or an
//! error.

use serde_json::{Value, json};

use super::batch::{split_command, status_list_command};
use super::{B24Client, BATCH_LIMIT, Category, Grant, MAX_PAGES, Page, lenient_i64};
use crate::crm::CrmError;
use crate::model::{B24Stage, EntityType, Semantics};

impl B24Client<'_> {
    /// Every stage of every deal category including the default one (0), or
    /// every lead status: two round trips for up to 50 categories (one for
    /// leads). With `grant`, `scope` and `profile` ride along in the first.
    ///
    /// A list that could not be read whole is an error (`ACCESS_DENIED`, a
    /// page cap, a page that came back empty where more were promised, a
    /// category or the default category missing its stages), never the part
    /// that was read. The one answer without stages is a webhook lacking
    /// the `crm` scope: then nothing could be read, and the grant says so —
    /// the caller refuses the webhook on it before writing anything.
    pub async fn stages(
        &self,
        entity: EntityType,
        with_grant: bool,
    ) -> Result<(Option<Grant>, Vec<B24Stage>), CrmError> {
        let (first, what) = match entity {
            EntityType::Deal => ("crm.category.list?entityTypeId=2".to_string(), "crm.category.list".to_string()),
            EntityType::Lead => (status_list_command("STATUS", None), "crm.status.list (STATUS)".to_string()),
        };
        let (grant, page) = if with_grant {
            let commands = [
                ("scope".to_string(), "scope".to_string()),
                ("profile".to_string(), "profile".to_string()),
                ("list".to_string(), first.clone()),
            ];
            let answer = match self.batch(&commands).await {
                // Without the `crm` scope the list command fails; the grant
                // says why. With it, the failure stands: a refused list is
                // an error, not an empty one.
                Err(e @ CrmError::Api { .. }) if e.api_code().is_some_and(is_scope_error) => {
                    let grant = self.grant().await?;
                    if has_crm_scope(&grant) {
                        return Err(e);
                    }
                    return Ok((Some(grant), Vec::new()));
                }
                other => other?,
            };
            let grant = answer.grant();
            if !has_crm_scope(&grant) {
                return Ok((Some(grant), Vec::new()));
            }
            let page = answer.page("list", &what)?;
            (Some(grant), page)
        } else {
            let (method, params) = split_command(&first);
            let envelope = self.call(&method, &params).await?;
            (None, Page { rows: list_rows(&envelope.result, &what)?, next: envelope.next, total: envelope.total })
        };
        let stages = match entity {
            EntityType::Lead => {
                let filter = json!({ "filter": { "ENTITY_ID": "STATUS" } });
                let rows = self.whole_list(&what, "crm.status.list", &filter, page).await?;
                // NEW, CONVERTED and JUNK cannot be deleted.
                if rows.is_empty() {
                    return Err(CrmError::Incomplete(format!(
                        "{what} lists no lead status, though every portal has NEW, CONVERTED and JUNK"
                    )));
                }
                parse_stages(&rows, &what, EntityType::Lead, 0, "")?
            }
            EntityType::Deal => {
                let rows = self.whole_list(&what, "crm.category.list", &json!({ "entityTypeId": 2 }), page).await?;
                let categories = parse_categories(&rows)?;
                // crm.category.list leaves out the categories the webhook's
                // user may not read. The default one cannot be deleted: a
                // list without it is such a filtered list (or a broken one).
                // A non-default category left out this way cannot be told
                // from a deleted one.
                if !categories.iter().any(|c| c.id == 0) {
                    return Err(CrmError::Incomplete(format!(
                        "{what} lacks the default category 0 (every portal has it; the list leaves out what \
                         the webhook's user may not read)"
                    )));
                }
                self.deal_stages(&categories).await?
            }
        };
        Ok((grant, stages))
    }

    /// The stages of the given categories, one `batch` per 50 categories.
    async fn deal_stages(&self, categories: &[Category]) -> Result<Vec<B24Stage>, CrmError> {
        let mut stages = Vec::new();
        for chunk in categories.chunks(BATCH_LIMIT) {
            let commands: Vec<(String, String)> = chunk
                .iter()
                .map(|c| (format!("c{}", c.id), status_list_command(&deal_stage_entity(c.id), None)))
                .collect();
            let answer = self.batch(&commands).await?;
            for category in chunk {
                let entity = deal_stage_entity(category.id);
                let what = format!("crm.status.list ({entity})");
                let first = answer.page(&format!("c{}", category.id), &what)?;
                let filter = json!({ "filter": { "ENTITY_ID": entity } });
                let rows = self.whole_list(&what, "crm.status.list", &filter, first).await?;
                // Every category has its NEW, WON and LOSE stages, which
                // cannot be deleted.
                if rows.is_empty() {
                    return Err(CrmError::Incomplete(format!(
                        "{what} lists no stage of category {} ({}), though every category has NEW, WON and LOSE",
                        category.id, category.name
                    )));
                }
                stages.extend(parse_stages(&rows, &what, EntityType::Deal, category.id, &category.name)?);
            }
        }
        Ok(stages)
    }

    /// The rows of a list whose first page is `first`, reading the further
    /// pages `next` promises. A page that comes back empty where `next`
    /// promised more, fewer rows than the largest `total` any page counted,
    /// a `next` that does not move forward, or more than [`MAX_PAGES`]
    /// pages: the list is incomplete, an error.
    async fn whole_list(&self, what: &str, method: &str, params: &Value, first: Page) -> Result<Vec<Value>, CrmError> {
        let Page { mut rows, mut next, mut total } = first;
        if rows.is_empty() && next.is_some() {
            return Err(CrmError::Incomplete(format!("{what} answered an empty first page that promised more")));
        }
        let mut pages = 1;
        while let Some(start) = next {
            if pages == MAX_PAGES {
                return Err(CrmError::Incomplete(format!("{what} did not end within {MAX_PAGES} pages")));
            }
            let mut params = params.clone();
            params["start"] = json!(start);
            let envelope = self.call(method, &params).await?;
            pages += 1;
            let page = list_rows(&envelope.result, what)?;
            if page.is_empty() {
                return Err(CrmError::Incomplete(format!(
                    "{what} broke off: the page from {start}, promised by `next`, came back empty"
                )));
            }
            rows.extend(page);
            total = total.max(envelope.total);
            next = envelope.next;
            if let Some(after) = next.filter(|after| *after <= start) {
                return Err(CrmError::Incomplete(format!("{what}: `next` went from {start} back to {after}")));
            }
        }
        let read = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        if let Some(total) = total.filter(|total| read < *total) {
            return Err(CrmError::Incomplete(format!("{what} broke off: {read} of {total} rows")));
        }
        Ok(rows)
    }
}

fn is_scope_error(code: &str) -> bool {
    code.eq_ignore_ascii_case("insufficient_scope")
}

fn has_crm_scope(grant: &Grant) -> bool {
    grant.scopes.iter().any(|s| s == "crm")
}

fn deal_stage_entity(category_id: i32) -> String {
    if category_id == 0 { "DEAL_STAGE".into() } else { format!("DEAL_STAGE_{category_id}") }
}

/// The rows of one list page: an array (`[]` when empty), or for
/// crm.category.list an object wrapping it in `categories`.
pub(super) fn list_rows(result: &Value, what: &str) -> Result<Vec<Value>, CrmError> {
    match result {
        Value::Array(rows) => Ok(rows.clone()),
        Value::Object(o) => match o.get("categories") {
            Some(Value::Array(rows)) => Ok(rows.clone()),
            _ => Err(CrmError::Malformed(format!("{what} answered an object that is not a list"))),
        },
        _ => Err(CrmError::Malformed(format!("{what} answered something that is not a list"))),
    }
}

/// Categories by `id` (or the older `ID`); one without an id is malformed,
/// not skipped.
fn parse_categories(rows: &[Value]) -> Result<Vec<Category>, CrmError> {
    rows.iter()
        .map(|c| {
            let id = c.get("id").or_else(|| c.get("ID")).and_then(lenient_i64).and_then(|id| i32::try_from(id).ok());
            let name = c.get("name").or_else(|| c.get("NAME")).and_then(Value::as_str).unwrap_or_default();
            let id =
                id.ok_or_else(|| CrmError::Malformed("crm.category.list listed a category without an id".into()))?;
            Ok(Category { id, name: name.to_string() })
        })
        .collect()
}

/// Every row as a stage; a row without a `STATUS_ID` is malformed, not skipped.
fn parse_stages(
    rows: &[Value],
    what: &str,
    entity_type: EntityType,
    category_id: i32,
    category_name: &str,
) -> Result<Vec<B24Stage>, CrmError> {
    rows.iter()
        .map(|row| {
            parse_stage(row, entity_type, category_id, category_name)
                .ok_or_else(|| CrmError::Malformed(format!("{what} listed a row without a `STATUS_ID`")))
        })
        .collect()
}

/// A `crm.status.list` row; numbers may arrive as strings, fields as null.
fn parse_stage(row: &Value, entity_type: EntityType, category_id: i32, category_name: &str) -> Option<B24Stage> {
    let status_id = row.get("STATUS_ID")?.as_str()?.to_string();
    let semantics = row
        .get("EXTRA")
        .and_then(|e| e.get("SEMANTICS"))
        .and_then(Value::as_str)
        .map(|s| if s == "apology" { Semantics::Failure } else { Semantics::parse(s).unwrap_or(Semantics::Process) })
        .unwrap_or_else(|| match row.get("SEMANTICS").and_then(Value::as_str) {
            Some("S") => Semantics::Success,
            Some("F") => Semantics::Failure,
            _ => Semantics::Process,
        });
    Some(B24Stage {
        entity_type,
        category_id,
        category_name: category_name.to_string(),
        status_name: row.get("NAME").and_then(Value::as_str).unwrap_or_default().to_string(),
        status_sort: row.get("SORT").and_then(lenient_i64).and_then(|s| i32::try_from(s).ok()).unwrap_or_default(),
        status_id,
        semantics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_rows_take_semantics_from_extra_and_apology_is_failure() {
        let row = |extra: Value, sem: Value| json!({ "STATUS_ID": "X", "NAME": "n", "SORT": "20", "SEMANTICS": sem, "EXTRA": extra });
        let semantics = |r: Value| parse_stage(&r, EntityType::Deal, 1, "c").unwrap().semantics;
        assert_eq!(semantics(row(json!({ "SEMANTICS": "apology" }), json!("F"))), Semantics::Failure);
        assert_eq!(semantics(row(json!({ "SEMANTICS": "success" }), Value::Null)), Semantics::Success);
        assert_eq!(semantics(row(Value::Null, json!("S"))), Semantics::Success);
        assert_eq!(semantics(row(Value::Null, Value::Null)), Semantics::Process);
        assert_eq!(parse_stage(&row(Value::Null, Value::Null), EntityType::Deal, 1, "c").unwrap().status_sort, 20);
    }
}
