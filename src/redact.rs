//! Redaction of secrets: every log line and every stored error message passes through
//! [`redact`], so a token that reaches an error string (a URL in a transport error, a
//! server echoing a header) never reaches the journal, the log file or the state database.

use std::sync::{Mutex, PoisonError};

static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Registers a secret to be masked from now on. Secrets shorter than 4 characters are
/// ignored: masking them would garble ordinary words and they protect nothing.
pub fn register(secret: &str) {
    if secret.len() < 4 {
        return;
    }
    let mut secrets = SECRETS.lock().unwrap_or_else(PoisonError::into_inner);
    if !secrets.iter().any(|s| s == secret) {
        secrets.push(secret.to_string());
        // Longest first, so a secret containing another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// Registers the password of a URL's userinfo (`http://user:pass@host`) in every form it
/// may take in a line: as written, percent-decoded, and inside the `Authorization: Basic`
/// value the HTTP client derives from it.
pub fn register_url(url: &str) {
    use base64::Engine;
    let Some((user, password)) = userinfo(url) else {
        return;
    };
    let (user, plain) = (percent_decoded(user), percent_decoded(password));
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{plain}"));
    for secret in [password.to_string(), plain, basic] {
        register(&secret);
    }
}

/// `(user, password)` of `scheme://user:password@host...`.
fn userinfo(url: &str) -> Option<(&str, &str)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (info, _) = authority.rsplit_once('@')?;
    info.split_once(':')
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) if bytes[i] == b'%' => {
                out.push(b);
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Returns `text` with every registered secret replaced by `***`.
pub fn redact(text: &str) -> String {
    let secrets = SECRETS.lock().unwrap_or_else(PoisonError::into_inner);
    let mut out = text.to_string();
    for s in secrets.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_registered_secrets() {
        register("s3cr3t-token");
        register("ab");
        assert_eq!(
            redact("GET http://h/config/s3cr3t-token failed: ab"),
            "GET http://h/config/*** failed: ab"
        );
    }

    #[test]
    fn masks_a_urls_password_in_every_form() {
        register_url("https://relais:p%40ss-w0rd-xyz@backend.example:8443/sync");
        assert_eq!(
            redact("https://relais:p%40ss-w0rd-xyz@backend.example p@ss-w0rd-xyz"),
            "https://relais:***@backend.example ***"
        );
        // base64("relais:p@ss-w0rd-xyz"), as in `Authorization: Basic ...`.
        assert_eq!(redact("Basic cmVsYWlzOnBAc3MtdzByZC14eXo="), "Basic ***");
        assert_eq!(userinfo("http://host/a@b"), None);
    }
}
