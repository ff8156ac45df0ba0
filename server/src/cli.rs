//! The command line: every flag has an environment variable (`--help` lists both).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::http::{accept, batch, uploads};

#[derive(Debug, Parser)]
#[command(
    name = "relais-server",
    version,
    about = "The receiving end of relais: stores each push once, streams media to disk"
)]
pub struct Cli {
    /// Address and port to listen on.
    #[arg(long, env = "RELAIS_SERVER_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// The store: sqlite:PATH (embedded, the default), or
    /// postgres://USER:PASSWORD@HOST:PORT/DATABASE (or postgresql://) for a fleet.
    // hide_env_values: `--help` would otherwise print DATABASE_URL's password.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite:relais-server.db",
        hide_env_values = true
    )]
    pub store: String,
    /// Directory of the media files (created if missing).
    #[arg(
        long,
        env = "RELAIS_SERVER_MEDIA_DIR",
        default_value = "relais-server-media"
    )]
    pub media_dir: PathBuf,
    /// Serve without authentication: pushes need no device token, /admin/ and /metrics
    /// no admin token (the demo, and the seed backend's behaviour).
    #[arg(long, env = "RELAIS_SERVER_NO_AUTH")]
    pub no_auth: bool,
    /// How long a token found in the store is trusted without asking the store again, in
    /// seconds: a revoked token is refused by every server within this time. 0: the
    /// store is asked at every request.
    #[arg(long, env = "RELAIS_SERVER_TOKEN_CACHE_S", default_value_t = 2)]
    pub token_cache_s: u64,
    /// Mark the console's cookies `Secure` on every answer, for a TLS proxy that does not
    /// send `X-Forwarded-Proto: https` (with it, they are Secure anyway).
    #[arg(long, env = "RELAIS_SERVER_CONSOLE_SECURE_COOKIE")]
    pub console_secure_cookie: bool,
    /// The console shows an agent late after 3 of its push intervals without contact, and
    /// never sooner than this many seconds, so that short intervals on a slow link do not
    /// flap between ok and late.
    #[arg(
        long,
        env = "RELAIS_SERVER_CONSOLE_LATE_FLOOR_S",
        default_value_t = 180
    )]
    pub console_late_floor_s: u64,
    /// Largest request body accepted, in bytes (a media push is its BLOB in base64,
    /// 4/3 of its size).
    #[arg(long, env = "RELAIS_SERVER_MAX_BODY_BYTES", default_value_t = 1 << 30)]
    pub max_body_bytes: usize,
    /// Longest time one request may take, in seconds, its upload included.
    #[arg(long, env = "RELAIS_SERVER_REQUEST_TIMEOUT_S", default_value_t = 600)]
    pub request_timeout_s: u64,
    /// Largest request head (request line and headers), in bytes: 431 above.
    #[arg(long, env = "RELAIS_SERVER_MAX_HEADER_BYTES", default_value_t = accept::MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,
    /// Longest time a client may take to send a request's head, and the longest a
    /// kept-alive connection may stay idle, in seconds; the connection is closed after.
    #[arg(long, env = "RELAIS_SERVER_HEADER_TIMEOUT_S", default_value_t = accept::HEADER_TIMEOUT_S)]
    pub header_timeout_s: u64,
    /// Connections served at once; further ones wait in the listen backlog until one
    /// closes.
    #[arg(long, env = "RELAIS_SERVER_MAX_CONNECTIONS", default_value_t = accept::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// On SIGTERM or SIGINT, how long requests in flight may take to finish, in seconds.
    #[arg(long, env = "RELAIS_SERVER_SHUTDOWN_GRACE_S", default_value_t = 30)]
    pub shutdown_grace_s: u64,
    /// Rows one batch (`POST /api/batch`) may hold at most: 413 above.
    #[arg(long, env = "RELAIS_SERVER_BATCH_MAX_ROWS", default_value_t = batch::MAX_ROWS)]
    pub batch_max_rows: usize,
    /// Largest batch body, in bytes, both as sent and decompressed: 413 above (at most
    /// --max-body-bytes).
    #[arg(long, env = "RELAIS_SERVER_BATCH_MAX_BYTES", default_value_t = batch::MAX_BYTES)]
    pub batch_max_bytes: usize,
    /// Largest resumable upload (`Upload-Length` of `POST /api/uploads`), in bytes:
    /// 413 above. Each PATCH is a request body too, within --max-body-bytes.
    #[arg(long, env = "RELAIS_SERVER_UPLOAD_MAX_BYTES", default_value_t = uploads::MAX_BYTES)]
    pub upload_max_bytes: u64,
    /// How long a resumable upload lives after its creation or its last PATCH, in
    /// seconds; then its row and its partial file are removed.
    #[arg(long, env = "RELAIS_SERVER_UPLOAD_EXPIRY_S", default_value_t = uploads::EXPIRY_S)]
    pub upload_expiry_s: u64,
    /// How often the store is checked while nothing is pushed, in seconds (one warning
    /// line when it stops answering, one info line when it is back).
    #[arg(
        long,
        env = "RELAIS_SERVER_STORE_CHECK_INTERVAL_S",
        default_value_t = 10
    )]
    pub store_check_interval_s: u64,
    /// Days of agents' hourly history kept (heartbeats and rows received per hour);
    /// older hours are removed once an hour.
    #[arg(long, env = "RELAIS_SERVER_HISTORY_DAYS", default_value_t = 30)]
    pub history_days: u64,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve (the default).
    Serve,
    /// Apply the store's migrations and exit.
    Migrate,
    /// Manage the bearer tokens (stored as their SHA-256 only).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Two-way sync settings (README, "Two-way sync: the server").
    #[command(subcommand)]
    Sync(SyncCommand),
}

#[derive(Debug, Subcommand)]
pub enum SyncCommand {
    /// Set how conflicts of one entity type of a tenant are resolved: server_wins (the
    /// default), client_wins, last_writer_wins, field_merge or manual.
    Strategy {
        #[arg(long)]
        tenant: String,
        #[arg(long = "type", value_name = "ENTITY_TYPE")]
        entity_type: String,
        #[arg(long)]
        strategy: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it once on stdout: it cannot be shown again.
    Add(TokenAdd),
    /// List the tokens (id, kind, device, note, created, revoked), never the tokens.
    List,
    /// Revoke a token by its id: requests bearing it get 401 from now on.
    Revoke { id: i64 },
}

#[derive(Debug, Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("holder").required(true).args(["device", "admin"])))]
pub struct TokenAdd {
    /// A device token: it may push the rows of this device_id only.
    #[arg(long)]
    pub device: Option<String>,
    /// An admin token (the admin API and /metrics), for this person or program.
    #[arg(long, value_name = "NAME")]
    pub admin: Option<String>,
    /// The sync tenant of a device token: without one, the token cannot sync.
    #[arg(long, conflicts_with = "admin")]
    pub tenant: Option<String>,
    /// A note on a device token (where it is installed, say).
    #[arg(long, conflicts_with = "admin")]
    pub note: Option<String>,
}
