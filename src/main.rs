//! The `relais` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use relais::daemon::{EXIT_CONFIG, EXIT_FAILED_ROWS, EXIT_OK};
use relais::settings::{Settings, SyncMode};
use relais::{clock, daemon, logging, outbox, state_lock, status, tracking};

const USAGE: &str = "usage: relais [--config FILE] [COMMAND]

commands:
  run            push continuously (the default when SYNC_MODE is continuous or periodic);
                 SIGUSR1: a pass and a pull now, SIGHUP: reload RELAIS_CONFIG, SIGTERM: stop
  once [--now]   one pass, then exit: 0 all pushed, 1 some rows failed or wait, 2 bad
                 configuration; --now: media go whatever the media windows say
  status [--json]  what was pushed, what failed and why
  retry-failed   make every failed row due now
  reconcile      queue every row below the high-water mark that was never sent
  forget SOURCE  close out the unsynced rows of a source whose file is gone
  outbox install     capture the changes of sync.tables (outbox table and triggers)
  outbox uninstall [--force]  remove exactly what install created
  outbox status [--json]      what is captured, the outbox's events per status
  state reset    move the state database aside (relais.db.bad-<time>) and start afresh
  demo           push a generated database to relais-server in-process, check every byte
  help, --help   print this text
  --version      print the version

Settings come from the environment (LOCAL_DB_PATH, BACKEND_URL, SYNC_INTERVAL_MINUTES,
DEVICE_ID, SYNC_MODE, ...) and the optional JSON file given by --config or RELAIS_CONFIG.
A backend for a development machine: relais-server --no-auth (cargo run -p relais-server
-- --no-auth --listen 127.0.0.1:8000).";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    ExitCode::from(run(&args).clamp(0, 255) as u8)
}

fn run(args: &[String]) -> i32 {
    let mut config: Option<PathBuf> = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => match it.next() {
                Some(p) => config = Some(PathBuf::from(p)),
                None => return usage_error("--config needs a file"),
            },
            "--version" | "-V" => {
                println!("relais {}", env!("CARGO_PKG_VERSION"));
                return EXIT_OK;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return EXIT_OK;
            }
            _ => rest.push(a.clone()),
        }
    }
    let command = rest.first().map(String::as_str).unwrap_or("");
    if command == "help" {
        println!("{USAGE}");
        return EXIT_OK;
    }
    if command == "demo" {
        return demo();
    }
    let load = || Settings::from_env(config.as_deref());
    let settings = match load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("relais: {e}");
            return EXIT_CONFIG;
        }
    };
    settings.register_secrets();
    match (command, rest.get(1).map(String::as_str)) {
        ("status", None) => status::run(&settings, false),
        ("status", Some("--json")) => status::run(&settings, true),
        ("retry-failed", None) => retry_failed(&settings),
        ("reconcile", None) => reconcile(&settings),
        ("forget", Some(source)) if rest.len() == 2 => forget(&settings, source),
        ("state", Some("reset")) if rest.len() == 2 => state_reset(&settings),
        ("outbox", Some(sub)) => match (sub, &rest[2..]) {
            ("install", []) => outbox::run_install(&settings),
            ("uninstall", []) => outbox::run_uninstall(&settings, false),
            ("uninstall", [force]) if force == "--force" => outbox::run_uninstall(&settings, true),
            ("status", []) => outbox::run_status(&settings, false),
            ("status", [json]) if json == "--json" => outbox::run_status(&settings, true),
            _ => usage_error(&format!("unknown command {:?}", rest.join(" "))),
        },
        ("run", None) => agent(&settings, false, &load),
        ("once", None) => agent(&settings, true, &load),
        ("once", Some("--now")) if rest.len() == 2 => {
            let mut now = settings.clone();
            now.media.override_windows = true;
            agent(&now, true, &load)
        }
        ("", None) => agent(&settings, settings.mode == SyncMode::Once, &load),
        _ => usage_error(&format!("unknown command {:?}", rest.join(" "))),
    }
}

fn agent(settings: &Settings, once: bool, load: daemon::Load) -> i32 {
    if let Some(warning) = logging::init(&settings.log) {
        log::warn!("{warning}");
    }
    daemon::run(settings, once, load)
}

fn retry_failed(settings: &Settings) -> i32 {
    match relais::tracking::Tracking::open(&settings.state_dir).and_then(|mut t| t.retry_failed()) {
        Ok(n) => {
            println!("{n} failed rows will be sent at the next pass");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("relais: {e}");
            EXIT_FAILED_ROWS
        }
    }
}

/// `relais reconcile`: the sweep alone; exit 0 when every table was swept.
fn reconcile(settings: &Settings) -> i32 {
    if let Some(warning) = logging::init(&settings.log) {
        log::warn!("{warning}");
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let report = match daemon::build_pusher(settings, None, stop) {
        Ok(mut pusher) => pusher.reconcile(),
        Err(e) => {
            log::error!("{e}");
            return EXIT_FAILED_ROWS;
        }
    };
    for e in &report.errors {
        log::error!("{e}");
    }
    if !report.errors.is_empty() {
        return EXIT_FAILED_ROWS;
    }
    println!(
        "reconcile: {} untracked rows queued; the next pass sends them",
        report.queued
    );
    EXIT_OK
}

/// `relais forget SOURCE`: recorded in the state database and in the log, never silent.
fn forget(settings: &Settings, source: &str) -> i32 {
    if let Some(warning) = logging::init(&settings.log) {
        log::warn!("{warning}");
    }
    match relais::source_registry::forget(&settings.state_dir, source) {
        Ok(done) => {
            log::warn!("{done}");
            EXIT_OK
        }
        Err(e) => {
            log::error!("{e}");
            EXIT_FAILED_ROWS
        }
    }
}

/// `relais state reset`: moves a state database that relais refuses (or one the operator
/// wants gone) aside, holding the state lock so that no agent is using it meanwhile.
fn state_reset(settings: &Settings) -> i32 {
    let command = "relais state reset";
    let wait = settings.state_lock_wait;
    let say_wait = |busy: &state_lock::LockError| {
        eprintln!(
            "relais: {busy}; waiting up to {}",
            clock::human_duration(wait)
        );
    };
    let _lock = match state_lock::acquire_waiting(&settings.state_dir, command, wait, say_wait) {
        Ok(lock) => lock,
        Err(e) => {
            eprintln!("relais: {}", e.explain(command));
            return EXIT_FAILED_ROWS;
        }
    };
    match tracking::set_aside(&settings.state_dir) {
        Ok(moved) if moved.is_empty() => {
            println!(
                "no state database in {}: nothing to reset",
                settings.state_dir.display()
            );
            EXIT_OK
        }
        Ok(moved) => {
            for (from, to) in moved {
                println!("moved {} to {}", from.display(), to.display());
            }
            println!(
                "the next pass starts afresh: every row of the application's database is sent \
                 again, under the same idempotency keys"
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("relais: {e}");
            EXIT_FAILED_ROWS
        }
    }
}

fn usage_error(problem: &str) -> i32 {
    eprintln!("relais: {problem}\n\n{USAGE}");
    EXIT_CONFIG
}

#[cfg(feature = "demo")]
fn demo() -> i32 {
    relais::demo::run()
}

#[cfg(not(feature = "demo"))]
fn demo() -> i32 {
    usage_error("this is a device build: the demo is not included")
}
