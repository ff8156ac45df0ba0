//! The validated configuration: what [`crate::cli::Cli`] says, checked once at start so
//! that a wrong flag is one line naming it, before anything is opened.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::Cli;
use crate::http::accept::{self, Limits};
use crate::http::{batch, uploads};
use crate::store::postgres::PostgresUrl;
use crate::store::sqlite;

/// Which store `--store` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    Postgres(PostgresUrl),
}

impl StoreUrl {
    /// What logs show: a PostgreSQL URL without its password.
    pub fn redacted(&self) -> String {
        match self {
            StoreUrl::Sqlite(path) => format!("sqlite:{}", path.display()),
            StoreUrl::Postgres(url) => url.redacted(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub store: StoreUrl,
    pub media_dir: PathBuf,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    /// `--no-auth`: every route open.
    pub no_auth: bool,
    /// `--token-cache-s`.
    pub token_cache: Duration,
    /// `--console-secure-cookie`.
    pub console_secure_cookie: bool,
    /// `--console-late-floor-s`.
    pub console_late_floor: Duration,
    /// What the accept loop enforces per connection.
    pub limits: Limits,
    pub store_check_interval: Duration,
    /// What `POST /api/batch` accepts.
    pub batch: batch::Limits,
    /// What `/api/uploads` accepts, and how long an upload lives.
    pub uploads: uploads::Limits,
    /// `--history-days`.
    pub history_days: u64,
}

impl Config {
    pub fn from_cli(cli: &Cli) -> Result<Config, String> {
        if cli.header_timeout_s == 0 {
            return Err("config: --header-timeout-s must be at least 1".into());
        }
        if cli.max_connections == 0 {
            return Err("config: --max-connections must be at least 1".into());
        }
        if cli.max_header_bytes < accept::MIN_HEADER_BYTES {
            return Err(format!(
                "config: --max-header-bytes must be at least {}",
                accept::MIN_HEADER_BYTES
            ));
        }
        if cli.batch_max_rows == 0 {
            return Err("config: --batch-max-rows must be at least 1".into());
        }
        if cli.batch_max_bytes < batch::MAX_ROW_BYTES {
            return Err(format!(
                "config: --batch-max-bytes must be at least {} (one row of the largest size)",
                batch::MAX_ROW_BYTES
            ));
        }
        if cli.history_days == 0 {
            return Err("config: --history-days must be at least 1".into());
        }
        if cli.upload_expiry_s == 0 {
            return Err("config: --upload-expiry-s must be at least 1".into());
        }
        Ok(Config {
            listen: cli.listen,
            store: parse_store(&cli.store)?,
            media_dir: cli.media_dir.clone(),
            max_body_bytes: cli.max_body_bytes,
            request_timeout: Duration::from_secs(cli.request_timeout_s),
            shutdown_grace: Duration::from_secs(cli.shutdown_grace_s),
            no_auth: cli.no_auth,
            token_cache: Duration::from_secs(cli.token_cache_s),
            console_secure_cookie: cli.console_secure_cookie,
            console_late_floor: Duration::from_secs(cli.console_late_floor_s),
            limits: Limits {
                max_header_bytes: cli.max_header_bytes,
                header_timeout: Duration::from_secs(cli.header_timeout_s),
                max_connections: cli.max_connections,
            },
            store_check_interval: Duration::from_secs(cli.store_check_interval_s.max(1)),
            batch: batch::Limits {
                max_rows: cli.batch_max_rows,
                // A batch is a request body too: what the capability document
                // announces must pass `--max-body-bytes`.
                max_bytes: cli.batch_max_bytes.min(cli.max_body_bytes),
            },
            uploads: uploads::Limits {
                max_bytes: cli.upload_max_bytes,
                expiry: Duration::from_secs(cli.upload_expiry_s),
            },
            history_days: cli.history_days,
        })
    }
}

fn parse_store(url: &str) -> Result<StoreUrl, String> {
    if let Some(path) = sqlite::path_of(url) {
        return Ok(StoreUrl::Sqlite(path));
    }
    if let Some(url) = PostgresUrl::parse(url) {
        return Ok(StoreUrl::Postgres(url));
    }
    // The value may hold a password: it is not repeated here.
    Err("store: --store (DATABASE_URL) must be sqlite:PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        assert_eq!(
            parse_store("sqlite:a/b.db"),
            Ok(StoreUrl::Sqlite("a/b.db".into()))
        );
        assert_eq!(
            parse_store("sqlite:///var/lib/r.db"),
            Ok(StoreUrl::Sqlite("/var/lib/r.db".into()))
        );
        let pg = parse_store("postgresql://u:secret@h/db").expect("postgres");
        assert_eq!(pg.redacted(), "postgresql://u:***@h/db");
        assert!(!format!("{pg:?}").contains("secret"));
        let mysql = parse_store("mysql://u:secret@h/db").unwrap_err();
        assert!(!mysql.contains("secret"), "{mysql}");
        assert!(parse_store("sqlite:").is_err());
    }
}
