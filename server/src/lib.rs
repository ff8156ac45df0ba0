//! relais-server as a library: the command line's pieces ([`cli`], [`config`]), the
//! HTTP layer ([`http`]), the fleet console ([`console`]), the media directory
//! ([`media`]), seed 001's configuration backend ([`site_config`]), the stores
//! ([`store`]), the bearer tokens ([`tokens`]) and the counters ([`metrics`]). The binary (`main.rs`) is a thin command line over
//! [`migrate`], [`serve`] and [`token`]; the agent's tests and demo start the same
//! server in-process ([`embedded`]).
//!
//! One code path for both stores: the store `--store` names is opened (and migrated) at
//! the top, then everything after is generic over [`Store`].

pub mod cli;
pub mod config;
pub mod console;
pub mod embedded;
pub mod http;
pub mod media;
pub mod metrics;
pub mod site_config;
pub mod store;
pub mod sync;
pub mod tokens;

use cli::{SyncCommand, TokenCommand};
use config::{Config, StoreUrl};
use store::Store;
use store::postgres::PostgresStore;
use store::sqlite::SqliteStore;

/// `relais-server migrate`: opens the store and applies its pending migrations.
pub fn migrate(config: &Config) -> Result<(), String> {
    runtime()?.block_on(async {
        match &config.store {
            StoreUrl::Sqlite(path) => open_sqlite(config, path).map(drop),
            StoreUrl::Postgres(url) => open_postgres(config, url).await.map(drop),
        }
    })
}

/// Opens and migrates the store, then serves until SIGTERM or SIGINT.
pub fn serve(config: &Config) -> Result<(), String> {
    runtime()?.block_on(async {
        match &config.store {
            StoreUrl::Sqlite(path) => serve_with(open_sqlite(config, path)?, config).await,
            StoreUrl::Postgres(url) => serve_with(open_postgres(config, url).await?, config).await,
        }
    })?;
    tracing::info!("stopped");
    Ok(())
}

/// `relais-server token ...`: its output (a new token, the list) goes to stdout.
pub fn token(config: &Config, command: &TokenCommand) -> Result<(), String> {
    runtime()?.block_on(async {
        let out = &mut std::io::stdout().lock();
        match &config.store {
            StoreUrl::Sqlite(path) => tokens::run(&open_sqlite(config, path)?, command, out).await,
            StoreUrl::Postgres(url) => {
                tokens::run(&open_postgres(config, url).await?, command, out).await
            }
        }
    })
}

/// `relais-server sync ...`.
pub fn sync_command(config: &Config, command: &SyncCommand) -> Result<(), String> {
    let SyncCommand::Strategy {
        tenant,
        entity_type,
        strategy,
    } = command;
    let strategy = sync::Strategy::parse(strategy).ok_or_else(|| {
        format!(
            "sync: strategy {strategy:?}: one of server_wins, client_wins, last_writer_wins, \
             field_merge, manual"
        )
    })?;
    let (tenant, entity_type) = (tenant.clone(), entity_type.clone());
    runtime()?.block_on(async {
        match &config.store {
            StoreUrl::Sqlite(path) => {
                open_sqlite(config, path)?
                    .set_sync_strategy(tenant, entity_type, strategy)
                    .await
            }
            StoreUrl::Postgres(url) => {
                open_postgres(config, url)
                    .await?
                    .set_sync_strategy(tenant, entity_type, strategy)
                    .await
            }
        }
        .map_err(|e| e.to_string())
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Runtime::new().map_err(|e| format!("runtime: {e}"))
}

fn open_sqlite(config: &Config, path: &std::path::Path) -> Result<SqliteStore, String> {
    let store = SqliteStore::open(path).map_err(|e| e.to_string())?;
    let applied = store.migrate().map_err(|e| e.to_string())?;
    log_migrated(config, &applied);
    Ok(store)
}

async fn open_postgres(
    config: &Config,
    url: &store::postgres::PostgresUrl,
) -> Result<PostgresStore, String> {
    let store = PostgresStore::open(url).map_err(|e| e.to_string())?;
    let applied = store.migrate().await.map_err(|e| e.to_string())?;
    log_migrated(config, &applied);
    Ok(store)
}

fn log_migrated(config: &Config, applied: &[i64]) {
    tracing::info!(
        "store {}: schema up to date ({} migration(s) applied now)",
        config.store.redacted(),
        applied.len()
    );
}

/// The router over the embedded store (SQLite) and the media directory `config` names,
/// both opened, the store migrated: what the in-process server ([`embedded`]) serves.
pub fn open_router(config: &Config) -> Result<axum::Router, String> {
    let StoreUrl::Sqlite(path) = &config.store else {
        return Err("embedded: the in-process server runs on a sqlite: store".into());
    };
    let store = open_sqlite(config, path)?;
    Ok(http::router(
        http::App::new(store, open_media(config)?),
        config,
    ))
}

/// How long a partial upload file may sit unwritten before it is a leftover: twice the
/// longest a request may take, a margin for the clocks of a shared (NFS) directory's
/// clients, whose server sets the files' times.
fn stale_upload(config: &Config) -> std::time::Duration {
    config.request_timeout * 2
}

/// How often expired uploads are looked for: an upload outlives its expiry by at most
/// this, a minute at most (one indexed DELETE per server).
fn expiry_sweep(config: &Config) -> std::time::Duration {
    (config.uploads.expiry / 2).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    )
}

// The seam for media shared by several servers: a directory every server mounts (NFS)
// works as is; an object store would implement MediaDir's place and remove.
fn open_media(config: &Config) -> Result<media::MediaDir, String> {
    media::MediaDir::open(&config.media_dir, stale_upload(config))
        .map_err(|e| format!("media: {}: {e}", config.media_dir.display()))
}

async fn serve_with<S: Store>(store: S, config: &Config) -> Result<(), String> {
    let media = open_media(config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("listen: {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| format!("listen: {e}"))?;
    let watch = tokio::spawn(store::watch::watch(
        store.clone(),
        config.store_check_interval,
    ));
    let sweep = tokio::spawn(media.clone().sweep_every(stale_upload(config)));
    if config.no_auth {
        tracing::warn!(
            "auth: --no-auth: no token needed, anyone who reaches {addr} may push for any \
             device and use the admin API and /metrics"
        );
    }
    tracing::info!(%addr, media_dir = %config.media_dir.display(), "listening");
    let app = http::App::new(store, media);
    let expire = tokio::spawn(http::uploads::expire_every(
        app.clone(),
        expiry_sweep(config),
    ));
    let flush = tokio::spawn(store::fleet::flush_every(app.store.clone()));
    let prune = tokio::spawn(store::fleet::prune_every(
        app.store.clone(),
        config.history_days,
    ));
    let router = http::router(app.clone(), config);
    let served = http::accept::serve_with(
        listener,
        router,
        config.limits,
        config.shutdown_grace,
        http::shutdown_signal(),
    )
    .await;
    watch.abort();
    sweep.abort();
    expire.abort();
    prune.abort();
    flush.abort();
    // The counts of the last seconds, which the periodic flush has not stored yet.
    store::fleet::flush(&app.store).await;
    served
}
