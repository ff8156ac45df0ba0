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
}
