//! What an AmoCRM access token says about itself: it is a JWT whose `iat`
//! and `exp` claims give its lifetime. Read leniently — a token that is not
//! a JWT, or a claim out of range, is `None` or clamped, never a panic.

use base64::Engine;
use chrono::{DateTime, TimeZone, Utc};

/// The latest time this program stores or computes with: later values are
/// clamped to it, so that no arithmetic on a foreign or absurd number overflows.
pub fn latest_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).single().unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn jwt_time(claims: &serde_json::Value, claim: &str) -> Option<DateTime<Utc>> {
    let value = claims.get(claim)?;
    let seconds = value.as_i64().or_else(|| value.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))?;
    Some(Utc.timestamp_opt(seconds, 0).single().unwrap_or(latest_time()).min(latest_time()))
}

/// The `exp` claim of a JWT access token (a long-lived token's expiry).
pub fn jwt_expiry(token: &str) -> Option<DateTime<Utc>> {
    jwt_time(&jwt_claims(token)?, "exp")
}

/// The `iat` claim of a JWT access token: when it was issued.
pub fn jwt_issued_at(token: &str) -> Option<DateTime<Utc>> {
    jwt_time(&jwt_claims(token)?, "iat")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_of_a_jwt_is_its_exp_claim() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#),
            b64(r#"{"exp":1893456000,"api_domain":"api-b.amocrm.ru"}"#)
        );
        assert_eq!(jwt_expiry(&token), Utc.timestamp_opt(1893456000, 0).single());
        assert_eq!(jwt_expiry("not-a-jwt"), None);
        assert_eq!(jwt_expiry(&format!("x.{}.y", b64("{}"))), None);
        assert_eq!(jwt_expiry(&format!("x.{}.y", b64(r#"{"exp":1e300}"#))), Some(latest_time()));
    }
}
