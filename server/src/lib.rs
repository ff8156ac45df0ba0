//! relais-server as a library: the command line's pieces ([`cli`], [`config`]), the
//! HTTP layer ([`http`]), the media directory ([`media`]), seed 001's configuration
//! backend ([`site_config`]), the stores ([`store`]), the bearer tokens ([`tokens`]) and
//! the counters ([`metrics`]). The binary (`main.rs`) is a thin command line over
//! [`open_store`], [`serve`] and [`token`]; the agent's tests and demo start the same
//! server in-process.

pub mod cli;
pub mod config;
pub mod http;
pub mod media;
pub mod metrics;
pub mod site_config;
pub mod store;
pub mod tokens;

use cli::TokenCommand;
use config::{Config, StoreUrl};
use store::sqlite::SqliteStore;

/// Opens the store and applies its pending migrations.
pub fn open_store(config: &Config) -> Result<SqliteStore, String> {
    let StoreUrl::Sqlite(path) = &config.store;
    let store = SqliteStore::open(path).map_err(|e| e.to_string())?;
    let applied = store.migrate().map_err(|e| e.to_string())?;
    tracing::info!(
        "store sqlite:{}: schema up to date ({} migration(s) applied now)",
        path.display(),
        applied.len()
    );
    Ok(store)
}

pub fn serve(config: &Config) -> Result<(), String> {
    let store = open_store(config)?;
    let media = media::MediaDir::open(&config.media_dir)
        .map_err(|e| format!("media: {}: {e}", config.media_dir.display()))?;
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("listen: {}: {e}", config.listen))?;
        let addr = listener.local_addr().map_err(|e| format!("listen: {e}"))?;
        if config.no_auth {
            tracing::warn!(
                "auth: --no-auth: no token needed, anyone who reaches {addr} may push for any \
                 device and use the admin API and /metrics"
            );
        }
        tracing::info!(%addr, media_dir = %config.media_dir.display(), "listening");
        let router = http::router(http::App { store, media }, config);
        http::accept::serve_with(
            listener,
            router,
            config.limits,
            config.shutdown_grace,
            http::shutdown_signal(),
        )
        .await
    })?;
    tracing::info!("stopped");
    Ok(())
}

/// `relais-server token ...`: its output (a new token, the list) goes to stdout.
pub fn token(config: &Config, command: &TokenCommand) -> Result<(), String> {
    let store = open_store(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(tokens::run(&store, command, &mut std::io::stdout().lock()))
}
