//! relais-server as a library: the command line's pieces ([`cli`], [`config`]), the
//! HTTP layer ([`http`]), the media directory ([`media`]) and the stores ([`store`]).
//! The binary (`main.rs`) is a thin command line over [`open_store`] and [`serve`]; the
//! agent's tests, demo and benchmarks start the same server in-process ([`embedded`]).

pub mod cli;
pub mod config;
pub mod embedded;
pub mod http;
pub mod media;
pub mod store;

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

/// The router over the store and the media directory `config` names (both opened, the
/// store migrated).
pub fn open_router(config: &Config) -> Result<axum::Router, String> {
    let store = open_store(config)?;
    let media = media::MediaDir::open(&config.media_dir)
        .map_err(|e| format!("media: {}: {e}", config.media_dir.display()))?;
    Ok(http::router(http::App { store, media }, config))
}

pub fn serve(config: &Config) -> Result<(), String> {
    let router = open_router(config)?;
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("listen: {}: {e}", config.listen))?;
        let addr = listener.local_addr().map_err(|e| format!("listen: {e}"))?;
        tracing::info!(%addr, media_dir = %config.media_dir.display(), "listening");
        http::serve(
            listener,
            router,
            config.shutdown_grace,
            http::shutdown_signal(),
        )
        .await
    })?;
    tracing::info!("stopped");
    Ok(())
}
