//! relais: pushes new rows of a device's SQLite database to a backend exactly once,
//! streams media BLOBs in bounded memory, and pulls the device configuration.
//!
//! The binary in `main.rs` is a thin command-line layer over these modules:
//!
//! - [`settings`]: environment variables and the optional JSON configuration file;
//!   [`device_id`]: the default device id; [`backend_url`]: `BACKEND_URL` checked whole;
//! - [`source`], [`payload`], [`blob_stream`]: reading the application's database;
//!   [`source_registry`]: which file is which source; [`reconcile`]: the sweep below the
//!   high-water mark; [`backlog`]: what is left to push;
//! - [`tracking`]: the agent's own state (`sync_tracking`, high-water marks);
//!   [`state_lock`]: one process per state directory;
//! - [`transport`], [`tcp_transport`], [`backoff`]: talking to the backend;
//! - [`push`]: one synchronisation pass; [`daemon`]: the loop, signals and schedule;
//! - [`notify`]: systemd readiness and watchdog;
//! - [`logging`], [`redact`], [`atomic_file`], [`clock`], [`json`]: shared mechanisms.

pub mod atomic_file;
pub mod backend_url;
pub mod backlog;
pub mod backoff;
pub mod batch;
pub mod blob_stream;
pub mod clock;
pub mod daemon;
pub mod device_id;
pub mod heartbeat;
pub mod json;
pub mod lane;
pub mod logging;
pub mod media_window;
pub mod notify;
pub mod payload;
pub mod pull;
pub mod push;
pub mod reconcile;
pub mod redact;
pub mod rejections;
pub mod settings;
pub mod source;
pub mod source_registry;
pub mod state_lock;
pub mod status;
pub mod tcp_transport;
pub mod tracking;
pub mod transport;
pub mod upload;

/// The configuration hash lives with the wire format both ends share.
pub use relais_wire::config_hash;

#[cfg(feature = "demo")]
pub mod demo;
#[cfg(feature = "demo")]
pub mod received;
#[cfg(feature = "demo")]
pub mod site_admin;
