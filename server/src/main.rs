//! relais-server: the receiving end of relais (README, "relais-server"). This file is
//! the command line only: parse, set up logging, run the command, map the outcome to
//! an exit code. Errors are one `area: detail` line.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;

use relais_server::cli::{Cli, Command};
use relais_server::config::Config;
use relais_server::{migrate, serve, sync_command, token};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = Config::from_cli(&cli).and_then(|config| match &cli.command {
        None | Some(Command::Serve) => serve(&config),
        Some(Command::Migrate) => migrate(&config),
        Some(Command::Token(command)) => token(&config, command),
        Some(Command::Sync(command)) => sync_command(&config, command),
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
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The pool warns once per connection it loses: an outage would be a burst of
    // lines. The store check says it once (store/watch.rs), unless RUST_LOG asks.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("deadpool")) {
        if let Ok(quiet) = "deadpool.postgres=error".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
