//! relais-server: the receiving end of relais (README, "relais-server"). This file is
//! the command line only: parse, set up logging, run the command, map the outcome to
//! an exit code. Errors are one `area: detail` line.

mod cli;
mod config;
mod http;
mod media;
mod store;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;

use cli::{Cli, Command};
use config::{Config, StoreUrl};
use store::sqlite::SqliteStore;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let serving = !matches!(cli.command, Some(Command::Migrate));
    let result = Config::from_cli(&cli, serving).and_then(|config| {
        if serving {
            serve(&config)
        } else {
            open_store(&config).map(|_| ())
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(line) => {
            tracing::error!("{line}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Opens the store and applies its pending migrations.
fn open_store(config: &Config) -> Result<SqliteStore, String> {
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

fn serve(config: &Config) -> Result<(), String> {
    let store = open_store(config)?;
    let media = media::MediaDir::open(&config.media_dir)
        .map_err(|e| format!("media: {}: {e}", config.media_dir.display()))?;
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("listen: {}: {e}", config.listen))?;
        let addr = listener.local_addr().map_err(|e| format!("listen: {e}"))?;
        tracing::info!(%addr, media_dir = %config.media_dir.display(), "listening");
        let router = http::router(http::App { store, media }, config);
        http::serve(listener, router, config.shutdown_grace).await
    })?;
    tracing::info!("stopped");
    Ok(())
}
