//! `model::Webhook::parse` on arbitrary text: never panics; an accepted
//! webhook has a positive user id, never shows its code when displayed, and
//! reads back equal from its own URL.

#![no_main]

use crm_connect::model::Webhook;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let Ok(w) = Webhook::parse(input) else { return };

    assert!(w.user_id() > 0, "user id {} accepted", w.user_id());

    let code = w.code().expose();
    assert!(!code.is_empty(), "empty code accepted");
    let url = w.method_url("");
    let url = url.expose();
    let shown = w.to_string();

    // `SCHEME://HOST/rest/USER_ID/` followed by the code, or by `***`.
    let prefix = url.strip_suffix('/').and_then(|u| u.strip_suffix(code));
    let prefix = prefix.unwrap_or_else(|| panic!("method URL does not end in the code: {url:?}"));
    assert_eq!(shown, format!("{prefix}***/"), "display is not the URL with its code masked");
    // The code may show only where it is also part of the scheme, host or user id.
    if shown.contains(code) {
        assert!(prefix.contains(code), "display shows the code: {shown:?}");
    }

    let again = Webhook::parse(url).unwrap_or_else(|e| panic!("own URL {shown} refused: {e}"));
    assert!(again == w, "own URL reads back different: {w:?} vs {again:?}");
});
