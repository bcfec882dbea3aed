//! The AmoCRM token decisions, as plans: how a reconcile obtains tokens
//! ([`obtain_step`]), whether the stored ones can be used or must be
//! refreshed first ([`refresh_step`]), and when to look again
//! ([`next_check`]). `tokens` executes these plans under the row lock;
//! `sync --dry-run` renders them — one copy of each rule. Pure: the clock
//! is an argument.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::model::{CrmState, StoredTokens, Tokens, jwt_expiry, jwt_issued_at, latest_time};
use crate::secret::Secret;

/// Lowercase hex SHA-256, as `amocrm_auth_code_sha256` stores it.
pub fn sha256_hex(value: &Secret) -> String {
    hex::encode(Sha256::digest(value.expose().as_bytes()))
}

/// How a reconcile obtains tokens from the tenant's file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObtainStep {
    /// The configured long-lived token differs from the stored tokens.
    StoreLongLived(Tokens),
    LongLivedUnchanged,
    /// The configured code was never sent: exchange it (once, ever).
    Exchange {
        code_sha256: String,
    },
    /// The configured code was sent before (exchanged or rejected): not again.
    CodeAlreadySent,
    /// Neither a code nor a long-lived token is configured.
    NothingConfigured,
    /// The configuration cannot give tokens; why.
    Invalid(&'static str),
}

/// The long-lived token wins over a code; a code whose hash is stored was
/// sent before.
pub fn obtain_step(long_lived: Option<&Secret>, code: Option<&Secret>, stored: &StoredTokens) -> ObtainStep {
    if let Some(token) = long_lived {
        let Some(expires_at) = jwt_expiry(token.expose()) else {
            return ObtainStep::Invalid("`amocrm.long_lived_token` is not a JWT with an `exp` claim");
        };
        if stored.access.as_ref() == Some(token) && stored.refresh.is_none() && stored.expires_at == Some(expires_at) {
            return ObtainStep::LongLivedUnchanged;
        }
        return ObtainStep::StoreLongLived(Tokens { access: token.clone(), refresh: None, expires_at });
    }
    match code {
        Some(code) => {
            let code_sha256 = sha256_hex(code);
            if stored.code_sha256.as_deref() == Some(code_sha256.as_str()) {
                ObtainStep::CodeAlreadySent
            } else {
                ObtainStep::Exchange { code_sha256 }
            }
        }
        None => ObtainStep::NothingConfigured,
    }
}

/// What to call the API with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefreshStep {
    /// The stored tokens, good as they are.
    Use(Tokens),
    /// Refresh first, with this refresh token.
    Refresh(Secret),
    /// Nothing usable; why.
    NeedsAuthorization(&'static str),
}

pub const NO_TOKENS: &str =
    "no tokens are stored: configure an authorization_code or long_lived_token, or run `crm-connect authorize`";
pub const NO_REFRESH_TOKEN: &str = "no refresh token is stored and the access token is expired or refused";
pub const REFRESH_REJECTED: &str =
    "the last refresh was rejected; a new authorization_code or long_lived_token is needed";

/// The stored tokens are used unless they are due (see [`next_check`]) or —
/// with `rejected` — the API just refused that very access token. A due
/// token is refreshed unless there is no refresh token (a long-lived token
/// serves until it expires) or the last refresh was rejected.
pub fn refresh_step(
    stored: &StoredTokens,
    state: Option<CrmState>,
    margin: Duration,
    rejected: Option<&Secret>,
    now: DateTime<Utc>,
) -> RefreshStep {
    if !due(stored, margin, rejected, now) {
        return usable(stored);
    }
    let Some(refresh) = &stored.refresh else {
        return match usable(stored) {
            RefreshStep::Use(tokens) if rejected.is_none() && tokens.expires_at > now => RefreshStep::Use(tokens),
            _ => RefreshStep::NeedsAuthorization(NO_REFRESH_TOKEN),
        };
    };
    if state == Some(CrmState::NeedsAuthorization) {
        return RefreshStep::NeedsAuthorization(REFRESH_REJECTED);
    }
    RefreshStep::Refresh(refresh.clone())
}

fn due(stored: &StoredTokens, margin: Duration, rejected: Option<&Secret>, now: DateTime<Utc>) -> bool {
    match (&stored.access, rejected) {
        (Some(access), Some(bad)) => access == bad,
        (None, _) => true,
        (Some(_), None) => match next_check(stored, margin) {
            NextCheck::Refresh { at, .. } | NextCheck::Expires(at) => at <= now,
            NextCheck::Nothing => true,
        },
    }
}

fn usable(stored: &StoredTokens) -> RefreshStep {
    match (&stored.access, stored.expires_at) {
        (Some(access), Some(expires_at)) => RefreshStep::Use(Tokens {
            access: access.clone(),
            refresh: stored.refresh.clone(),
            expires_at: expires_at.min(latest_time()),
        }),
        _ => RefreshStep::NeedsAuthorization(NO_TOKENS),
    }
}

/// When a stored token needs attention next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextCheck {
    /// Refresh at this moment, before the token `expires`; `capped` when
    /// the margin was not shorter than the token's lifetime and half the
    /// lifetime is used instead.
    Refresh { at: DateTime<Utc>, expires: DateTime<Utc>, capped: bool },
    /// A token without a refresh token (long-lived): nothing to do until it
    /// expires, then `needs_authorization`.
    Expires(DateTime<Utc>),
    /// No usable token is stored.
    Nothing,
}

/// The cadence rule: `margin` before expiry, but when the margin is not
/// shorter than the token's lifetime (known from its JWT), at half the
/// lifetime — at most one refresh per half lifetime, never a loop.
pub fn next_check(stored: &StoredTokens, margin: Duration) -> NextCheck {
    let (Some(access), Some(expires_at)) = (&stored.access, stored.expires_at) else {
        return NextCheck::Nothing;
    };
    if stored.refresh.is_none() {
        return NextCheck::Expires(expires_at);
    }
    let margin = chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::MAX);
    let lifetime = jwt_issued_at(access.expose()).map(|issued| expires_at - issued);
    let (margin, capped) = match lifetime {
        Some(lifetime) if lifetime > chrono::Duration::zero() && margin >= lifetime => (lifetime / 2, true),
        _ => (margin, false),
    };
    let at = expires_at.checked_sub_signed(margin).unwrap_or(DateTime::<Utc>::MIN_UTC);
    NextCheck::Refresh { at, expires: expires_at, capped }
}

impl NextCheck {
    /// When the stored access token expires; `None` when none is stored.
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        match *self {
            NextCheck::Refresh { expires, .. } | NextCheck::Expires(expires) => Some(expires),
            NextCheck::Nothing => None,
        }
    }

    /// How long before expiry the refresh is due: the margin in force,
    /// capped or not; `None` when no refresh is planned.
    pub fn margin(&self) -> Option<chrono::Duration> {
        match *self {
            NextCheck::Refresh { at, expires, .. } => Some(expires.signed_duration_since(at)),
            NextCheck::Expires(_) | NextCheck::Nothing => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    fn jwt(iat: DateTime<Utc>, exp: DateTime<Utc>) -> Secret {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let claims = format!(r#"{{"iat":{},"exp":{}}}"#, iat.timestamp(), exp.timestamp());
        Secret::new(format!("{}.{}.sig", b64("{}"), b64(&claims)))
    }

    fn secret(s: &str) -> Secret {
        Secret::new(s.to_string())
    }

    /// JWT times are whole seconds.
    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap()
    }

    fn hours(h: i64) -> chrono::Duration {
        chrono::Duration::hours(h)
    }

    fn stored(iat: DateTime<Utc>, exp: DateTime<Utc>, refresh: bool) -> StoredTokens {
        StoredTokens {
            access: Some(jwt(iat, exp)),
            refresh: refresh.then(|| secret("r")),
            expires_at: Some(exp),
            ..StoredTokens::default()
        }
    }

    #[test]
    fn a_margin_not_shorter_than_the_lifetime_is_capped_at_half_the_lifetime() {
        let issued = now();
        let day = issued + hours(24);
        let margin = |h: u64| Duration::from_secs(h * 3600);
        let check = |stored: &StoredTokens, m: Duration, expected: NextCheck| {
            assert_eq!(next_check(stored, m), expected, "margin {m:?}");
        };
        check(
            &stored(issued, day, true),
            margin(1),
            NextCheck::Refresh { at: day - hours(1), expires: day, capped: false },
        );
        check(
            &stored(issued, day, true),
            margin(25),
            NextCheck::Refresh { at: issued + hours(12), expires: day, capped: true },
        );
        check(&stored(issued, day, false), margin(25), NextCheck::Expires(day));
        check(&StoredTokens::default(), margin(1), NextCheck::Nothing);
        let margin_in_force = |m: Duration| next_check(&stored(issued, day, true), m).margin();
        assert_eq!(margin_in_force(margin(1)), Some(hours(1)));
        assert_eq!(margin_in_force(margin(25)), Some(hours(12)));
        assert_eq!(next_check(&stored(issued, day, false), margin(25)).margin(), None);
        assert_eq!(next_check(&stored(issued, day, false), margin(25)).expires_at(), Some(day));
        assert_eq!(next_check(&stored(issued, day, true), margin(1)).expires_at(), Some(day));
        assert_eq!(NextCheck::Nothing.expires_at(), None);
        // A margin of 300,000 years neither overflows nor loops.
        let absurd = Duration::from_secs(300_000 * 365 * 86_400);
        let opaque = StoredTokens {
            access: Some(secret("opaque")),
            refresh: Some(secret("r")),
            expires_at: Some(day),
            ..StoredTokens::default()
        };
        assert!(matches!(next_check(&opaque, absurd), NextCheck::Refresh { capped: false, .. }));
        assert!(matches!(next_check(&stored(issued, day, true), absurd), NextCheck::Refresh { capped: true, .. }));
    }

    #[test]
    fn obtaining() {
        let issued = now();
        let exp = issued + hours(24);
        let long_lived = jwt(issued, exp);
        let code = secret("code-1");
        let hash = sha256_hex(&code);
        let with_code_sent = StoredTokens { code_sha256: Some(hash.clone()), ..StoredTokens::default() };
        let with_long_lived =
            StoredTokens { access: Some(long_lived.clone()), expires_at: Some(exp), ..StoredTokens::default() };
        let check = |long: Option<&Secret>, code: Option<&Secret>, stored: &StoredTokens, expected: ObtainStep| {
            assert_eq!(obtain_step(long, code, stored), expected);
        };
        let stored_long =
            ObtainStep::StoreLongLived(Tokens { access: long_lived.clone(), refresh: None, expires_at: exp });
        check(Some(&long_lived), None, &StoredTokens::default(), stored_long.clone());
        check(Some(&long_lived), Some(&code), &StoredTokens::default(), stored_long);
        check(Some(&long_lived), None, &with_long_lived, ObtainStep::LongLivedUnchanged);
        check(
            Some(&secret("opaque")),
            None,
            &StoredTokens::default(),
            ObtainStep::Invalid("`amocrm.long_lived_token` is not a JWT with an `exp` claim"),
        );
        check(None, Some(&code), &StoredTokens::default(), ObtainStep::Exchange { code_sha256: hash });
        check(None, Some(&code), &with_code_sent, ObtainStep::CodeAlreadySent);
        check(None, None, &with_code_sent, ObtainStep::NothingConfigured);
    }

    #[test]
    fn refreshing() {
        let t = now();
        let margin = Duration::from_secs(3600);
        let fresh = stored(t - hours(1), t + hours(23), true);
        let due = stored(t - hours(23), t + hours(1) - chrono::Duration::seconds(1), true);
        let long_lived = stored(t - hours(1), t + hours(23), false);
        let expired_long_lived = stored(t - hours(25), t - hours(1), false);
        let use_ = |s: &StoredTokens| {
            RefreshStep::Use(Tokens {
                access: s.access.clone().unwrap(),
                refresh: s.refresh.clone(),
                expires_at: s.expires_at.unwrap(),
            })
        };
        let refresh = RefreshStep::Refresh(secret("r"));
        let check =
            |stored: &StoredTokens, state: Option<CrmState>, rejected: Option<&Secret>, expected: RefreshStep| {
                assert_eq!(refresh_step(stored, state, margin, rejected, t), expected);
            };
        check(&fresh, None, None, use_(&fresh));
        check(&due, None, None, refresh.clone());
        check(&due, Some(CrmState::Connected), None, refresh.clone());
        check(&due, Some(CrmState::NeedsAuthorization), None, RefreshStep::NeedsAuthorization(REFRESH_REJECTED));
        // A 401 for the stored token refreshes it at once; for another token
        // (replaced since), the stored one is used.
        check(&fresh, None, fresh.access.as_ref(), refresh.clone());
        check(&fresh, None, Some(&secret("older")), use_(&fresh));
        check(&long_lived, None, None, use_(&long_lived));
        check(&long_lived, None, long_lived.access.as_ref(), RefreshStep::NeedsAuthorization(NO_REFRESH_TOKEN));
        check(&expired_long_lived, None, None, RefreshStep::NeedsAuthorization(NO_REFRESH_TOKEN));
        check(&StoredTokens::default(), None, None, RefreshStep::NeedsAuthorization(NO_REFRESH_TOKEN));
    }
}
