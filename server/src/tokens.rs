//! Bearer tokens: made here (32 random bytes from the kernel, shown once as hex), kept
//! in the store as their SHA-256 only, and the `token add|list|revoke` commands over any
//! [`Store`]. The HTTP side (who may call what) is `http/auth.rs`.

use std::io::{Read as _, Write};

use sha2::{Digest as _, Sha256};

use crate::cli::{TokenAdd, TokenCommand};
use crate::store::{NewToken, Revoked, Store, TokenInfo, TokenKind};
use relais_wire::hex;

/// 256 bits: guessing is hopeless, so the hash needs no salt nor slow function.
const TOKEN_BYTES: usize = 32;

/// A new token, lowercase hex.
pub fn generate() -> Result<String, String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("token: cannot read /dev/urandom: {e}"))?;
    Ok(hex(&bytes))
}

/// What the store keeps of `token`, and looks it up by.
pub fn sha256_hex(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Runs a `token` command against `store`, writing its output to `out`.
pub async fn run<S: Store>(
    store: &S,
    command: &TokenCommand,
    out: &mut impl Write,
) -> Result<(), String> {
    let written = match command {
        TokenCommand::Add(add) => {
            let (token, id) = add_token(store, add).await?;
            tracing::info!("token {id} added: it is printed once, store it now");
            writeln!(out, "{token}")
        }
        TokenCommand::List => {
            let tokens = store.list_tokens().await.map_err(|e| e.to_string())?;
            out.write_all(table(&tokens).as_bytes())
        }
        TokenCommand::Revoke { id } => {
            match store.revoke_token(*id).await.map_err(|e| e.to_string())? {
                Revoked::Now => tracing::info!("token {id} revoked"),
                Revoked::Already => tracing::info!("token {id} was already revoked"),
                Revoked::NoSuchToken => {
                    return Err(format!(
                        "token: no token with id {id} (`relais-server token list` shows them)"
                    ));
                }
            }
            Ok(())
        }
    };
    written.map_err(|e| format!("token: cannot write the output: {e}"))
}

async fn add_token<S: Store>(store: &S, add: &TokenAdd) -> Result<(String, i64), String> {
    let (kind, device_id, note) = match (&add.device, &add.admin) {
        (Some(device), _) if !device.is_empty() => {
            (TokenKind::Device, Some(device.clone()), add.note.clone())
        }
        (None, Some(name)) if !name.is_empty() => (TokenKind::Admin, None, Some(name.clone())),
        _ => return Err("token: --device ID or --admin NAME must not be empty".into()),
    };
    let token = generate()?;
    let id = store
        .add_token(NewToken {
            kind,
            device_id,
            note,
            tenant: add.tenant.clone().filter(|t| !t.is_empty()),
            sha256: sha256_hex(&token),
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok((token, id))
}

/// `token list`'s output: a header and one aligned line per token.
fn table(tokens: &[TokenInfo]) -> String {
    let header = ["id", "kind", "device", "note", "created", "revoked"].map(String::from);
    let rows: Vec<[String; 6]> = std::iter::once(header)
        .chain(tokens.iter().map(|t| {
            [
                t.id.to_string(),
                t.kind.as_str().to_string(),
                t.device_id.clone().unwrap_or_else(|| "-".into()),
                t.note.clone().unwrap_or_else(|| "-".into()),
                t.created_at.clone(),
                t.revoked_at.clone().unwrap_or_else(|| "-".into()),
            ]
        }))
        .collect();
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, &w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_64_hex_digits_and_differ() {
        let (a, b) = (generate().expect("a"), generate().expect("b"));
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(sha256_hex(&a).len(), 64);
        assert_ne!(sha256_hex(&a), a);
    }
}
