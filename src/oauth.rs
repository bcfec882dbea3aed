//! AmoCRM browser authorisation, without any HTTP serving: the state
//! format `<slug>.<random>` (stored in the tenant's database as a SHA-256
//! only, usable once within [`STATE_LIFETIME`]), the referer check and the
//! authorisation URL. `auth-url` issues a state and prints the URL; the
//! daemon's callback (`server`) consumes it.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;

use crate::config::AmoCrmConfig;
use crate::db::{self, DbError, TenantDb};
use crate::reconcile::tokens::sha256_hex;
use crate::secret::Secret;

/// How long a state printed by `auth-url` can complete an authorisation.
pub const STATE_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// Random bytes in a state: guessing one is out of the question.
const STATE_RANDOM_BYTES: usize = 32;

/// A fresh single-use state for `slug`, recorded (hashed) in its database.
pub async fn issue_state(db: &TenantDb, slug: &str) -> Result<Secret, DbError> {
    let mut random = [0u8; STATE_RANDOM_BYTES];
    rand::rng().fill_bytes(&mut random);
    let state = Secret::new(format!("{slug}.{}", URL_SAFE_NO_PAD.encode(random)));
    db::oauth_states::insert(&db.session().await?, &sha256_hex(&state), STATE_LIFETIME).await?;
    Ok(state)
}

/// Spends `state` if it is live: true at most once per issued state.
pub async fn consume_state(db: &TenantDb, state: &str) -> Result<bool, DbError> {
    let hash = sha256_hex(&Secret::new(state));
    db::oauth_states::consume(&db.session().await?, &hash).await
}

/// The slug a state names, if the state has the shape [`issue_state`] gives.
pub fn state_slug(state: &str) -> Option<&str> {
    let (slug, random) = state.split_once('.')?;
    let shaped = !slug.is_empty()
        && slug.len() <= 48
        && slug.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && random.len() == (STATE_RANDOM_BYTES * 4).div_ceil(3)
        && random.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    shaped.then_some(slug)
}

/// AmoCRM sends a bare host; a URL of that host (no path) is accepted too.
pub fn referer_matches(referer: &str, expected: &str) -> bool {
    let referer = referer.trim();
    let host = match referer.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("http") => {
            rest.strip_suffix('/').unwrap_or(rest)
        }
        Some(_) => return false,
        None => referer,
    };
    !host.is_empty() && host.eq_ignore_ascii_case(expected)
}

/// `https://www.amocrm.ru/oauth?client_id=…&state=…&mode=post_message`, on
/// the domain's own host, or `<base_url>/oauth?…` for a sandbox.
pub fn authorization_url(amo: &AmoCrmConfig, client_id: &str, state: &Secret) -> Result<url::Url, String> {
    let base = amo.account.authorize_base();
    let mut url = url::Url::parse(&format!("{base}/oauth")).map_err(|e| format!("`amocrm.base_url`: {e}"))?;
    url.query_pairs_mut()
        .append_pair("client_id", client_id)
        .append_pair("state", state.expose())
        .append_pair("mode", "post_message");
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_names_its_slug_only_in_the_issued_shape() {
        let random = URL_SAFE_NO_PAD.encode([7u8; STATE_RANDOM_BYTES]);
        assert_eq!(state_slug(&format!("acme_2.{random}")), Some("acme_2"));
        assert_eq!(state_slug(&format!("Acme.{random}")), None);
        assert_eq!(state_slug(&format!(".{random}")), None);
        assert_eq!(state_slug(&format!("acme.{random}x")), None);
        assert_eq!(state_slug(&format!("acme.{}", &random[1..])), None);
        assert_eq!(state_slug(&format!("acme.{}", random.replace(|_| true, "+"))), None);
        assert_eq!(state_slug("acme"), None);
        assert_eq!(state_slug(""), None);
    }

    #[test]
    fn the_referer_must_be_the_account_host() {
        assert!(referer_matches("acme.amocrm.ru", "acme.amocrm.ru"));
        assert!(referer_matches("ACME.amocrm.RU", "acme.amocrm.ru"));
        assert!(referer_matches("https://acme.amocrm.ru/", "acme.amocrm.ru"));
        assert!(referer_matches("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(!referer_matches("evil.amocrm.ru", "acme.amocrm.ru"));
        assert!(!referer_matches("acme.amocrm.ru.evil.com", "acme.amocrm.ru"));
        assert!(!referer_matches("https://acme.amocrm.ru/path", "acme.amocrm.ru"));
        assert!(!referer_matches("ftp://acme.amocrm.ru", "acme.amocrm.ru"));
        assert!(!referer_matches("", "acme.amocrm.ru"));
    }
}
