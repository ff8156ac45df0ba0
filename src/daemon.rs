//! The agent's loops. Each lane ([`crate::lane`]: events, media) runs its own: a push
//! pass, then a sleep until the next one is due, a signal arrives, or the lane's backoff
//! after a failure has passed. The lanes sleep on channels, so an idle agent is never
//! woken periodically. The main thread only dispatches: signals become wake-ups for
//! both lanes, SIGHUP's new settings go to both.
//!
//! SIGTERM and SIGINT stop the agent; an upload in flight is abandoned at the next chunk
//! (the row stays pending and is sent again, under the same idempotency key). Should
//! the network hold the agent up, it exits anyway after [`STOP_GRACE`]: its state is
//! consistent at every instant, so a forced exit loses nothing. SIGUSR1 starts a pass now.
//! SIGHUP reads the settings again and starts a pass with them ([`reload`]); `relais once`
//! takes it as a stop request. `relais once` runs one pass of each lane, at the same time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use crate::backoff::Backoff;
use crate::lane::Lane;
use crate::pull::{self, PullActivity, PullWake};
use crate::push::{CycleReport, Interruption, Pusher};
use crate::settings::{Settings, SettingsError};
use crate::state_lock::{self, LockError, StateLock};
use crate::tracking::Tracking;
use crate::transport::Transport;
use crate::{backlog, clock, heartbeat, notify, status};

/// Longest time between a stop signal and the agent's exit.
pub const STOP_GRACE: Duration = Duration::from_millis(4500);

/// Exit codes, as documented in the README.
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED_ROWS: i32 = 1;
pub const EXIT_CONFIG: i32 = 2;

/// What the signal thread tells the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Stop,
    SyncNow,
    /// SIGHUP: read the settings again, then a pass.
    Reload,
}

/// Reads the settings again, as at start-up (SIGHUP).
pub type Load<'a> = &'a dyn Fn() -> Result<Settings, SettingsError>;

/// The running configuration pull's channel: shared with the signal thread, so that
/// SIGUSR1 reaches the pull while a pass runs, and replaced when a reload restarts it.
type PullHandle = Arc<Mutex<Option<(Sender<PullWake>, PullActivity)>>>;

/// Sets up the pusher of `lane`'s tables (`None`: every table) from the settings; errors
/// are one operator-readable line.
pub fn build_pusher(
    settings: &Settings,
    lane: Option<Lane>,
    stop: Arc<AtomicBool>,
) -> Result<Pusher, String> {
    let tracking = Tracking::open(&settings.state_dir).map_err(|e| e.to_string())?;
    let transport = Transport::new(&settings.http).map_err(|e| e.to_string())?;
    Ok(match lane {
        Some(lane) => Pusher::for_lane(lane, settings, tracking, transport, stop),
        None => Pusher::new(settings.clone(), tracking, transport, stop),
    })
}

/// What the lanes share.
struct Shared {
    /// Taken by the first lane that can (see [`hold_lock`]), held for the process's life.
    lock: Mutex<Option<StateLock>>,
    stop: Arc<AtomicBool>,
    command: &'static str,
    /// The media lane's last pass, for the event lane's heartbeat.
    media_pass: Mutex<Option<relais_wire::heartbeat::Pass>>,
}

/// What the signal thread's dispatcher tells a lane.
enum LaneWake {
    Stop,
    SyncNow,
    /// The settings read again at SIGHUP, valid.
    Settings(Box<Settings>),
}

/// Why a lane's pass could not run.
enum Unbuilt {
    /// The state database or its lock file cannot be opened: tried again after a backoff.
    State(String),
    /// Another process owns the state directory: the agent stops (the line says why).
    Owned(String),
}

/// Runs one pass of each lane (`once`) or the lanes' loops until a stop signal; returns
/// the exit code.
pub fn run(settings: &Settings, once: bool, load: Load) -> i32 {
    let mut settings = settings.clone();
    let command = if once { "relais once" } else { "relais run" };
    // Taken before anything else (the configuration pull included), held for the
    // process's life. A state directory that cannot be locked yet (not writable) is
    // retried with the state database at each pass: it must not stop the agent.
    let mut lock = None;
    if let Err(line) = hold_lock(&mut lock, &settings, command, settings.state_lock_wait) {
        log::error!("{line}");
        return EXIT_FAILED_ROWS;
    }
    let shared = Shared {
        lock: Mutex::new(lock),
        stop: Arc::new(AtomicBool::new(false)),
        command,
        media_pass: Mutex::new(None),
    };
    let (tx, rx) = mpsc::channel();
    let pull: PullHandle = Arc::new(Mutex::new(if once { None } else { start_pull(&settings) }));
    if let Err(e) = watch_signals(tx.clone(), pull.clone(), shared.stop.clone(), once) {
        log::error!("signals: cannot install handlers: {e}");
        return EXIT_FAILED_ROWS;
    }
    log::info!(
        "relais {} started: device {} ({}), database {}, backend {}, {}",
        env!("CARGO_PKG_VERSION"),
        settings.device_id,
        settings.device_id_origin,
        settings.local_db_path,
        settings.http.backend_url,
        if once {
            "one pass".to_string()
        } else {
            format!("every {}", clock::human_duration(settings.interval))
        }
    );
    notify::ready("started");
    if once {
        return run_once(&settings, &shared);
    }
    let code = std::thread::scope(|scope| {
        let mut lanes = Vec::new();
        let mut code = EXIT_OK;
        for lane in Lane::ALL {
            let (wake, woken) = mpsc::channel();
            let (looped, shared, main) = (LaneLoop::new(lane, &settings), &shared, tx.clone());
            match std::thread::Builder::new()
                .name(format!("{}-lane", lane.name()))
                .spawn_scoped(scope, move || looped.run(shared, &woken, &main))
            {
                Ok(handle) => lanes.push((wake, handle)),
                Err(e) => {
                    log::error!("{} lane: cannot start its thread: {e}", lane.name());
                    shared.stop.store(true, Ordering::Relaxed);
                    let _ = tx.send(Wake::Stop);
                    code = EXIT_FAILED_ROWS;
                }
            }
        }
        let tell = |wake: &dyn Fn() -> LaneWake| {
            for (lane, _) in &lanes {
                let _ = lane.send(wake());
            }
        };
        loop {
            match rx.recv() {
                Ok(Wake::SyncNow) => tell(&|| LaneWake::SyncNow),
                Ok(Wake::Reload) => {
                    if let Some(new) = reload(&settings, load, &pull) {
                        settings = new;
                        // Applied by each lane from its next pass, which starts now; what
                        // is recorded lives in the state database.
                        tell(&|| LaneWake::Settings(Box::new(settings.clone())));
                    }
                }
                Ok(Wake::Stop) | Err(_) => break,
            }
        }
        tell(&|| LaneWake::Stop);
        lanes
            .into_iter()
            .map(|(_, handle)| handle.join().unwrap_or(EXIT_FAILED_ROWS))
            .fold(code, i32::max)
    });
    notify::stopping();
    log::info!("relais stopping");
    code
}

/// `relais once`: one pass of each lane that has tables, at the same time, as `run`
/// would; then the configuration pull.
fn run_once(settings: &Settings, shared: &Shared) -> i32 {
    let lanes = Lane::ALL.into_iter().filter(|l| l.has_work(settings));
    let passes: Vec<Option<(LaneLoop, Result<CycleReport, Unbuilt>)>> =
        std::thread::scope(|scope| {
            let running: Vec<_> = lanes
                .map(|lane| {
                    let mut looped = LaneLoop::new(lane, settings);
                    scope.spawn(move || {
                        let pass = looped.pass(shared);
                        (looped, pass)
                    })
                })
                .collect();
            running.into_iter().map(|h| h.join().ok()).collect()
        });
    let pulled = pull_once(settings);
    notify::stopping();
    let mut reports = Vec::new();
    let mut events = None;
    let mut code = EXIT_OK;
    for pass in passes {
        match pass {
            Some((looped, Ok(report))) => {
                reports.push(report);
                if looped.lane == Lane::Events {
                    events = looped.pusher;
                }
            }
            Some((_, Err(Unbuilt::State(line) | Unbuilt::Owned(line)))) => {
                log::error!("{line}");
                code = EXIT_FAILED_ROWS;
            }
            None => code = EXIT_FAILED_ROWS,
        }
    }
    match events {
        Some(mut pusher) if code == EXIT_OK => once_exit_code(settings, &reports, &mut pusher),
        _ => EXIT_FAILED_ROWS,
    }
    .max(pulled)
}

/// One lane's loop: its pusher, its backoff.
struct LaneLoop {
    lane: Lane,
    settings: Settings,
    /// Built lazily and rebuilt after a state failure: an unwritable state directory
    /// must not stop the agent (the configuration pull can still work), and must heal by
    /// itself once the operator fixes it.
    pusher: Option<Pusher>,
    backoff: Backoff,
    clock_watch: clock::ClockWatch,
    heartbeats: heartbeat::Heartbeats,
}

impl LaneLoop {
    fn new(lane: Lane, settings: &Settings) -> LaneLoop {
        LaneLoop {
            lane,
            settings: settings.clone(),
            pusher: None,
            backoff: Backoff::new(&settings.retry),
            clock_watch: clock::ClockWatch::default(),
            heartbeats: heartbeat::Heartbeats::default(),
        }
    }

    /// Passes until a stop; returns the exit code. Another process taking the state
    /// directory stops the whole agent: the dispatcher is told through `main`.
    fn run(mut self, shared: &Shared, woken: &Receiver<LaneWake>, main: &Sender<Wake>) -> i32 {
        loop {
            let delay = if self.lane.has_work(&self.settings) {
                let (interrupted, wrong_url, window) = match self.pass(shared) {
                    Ok(report) => {
                        if report.progressed() {
                            self.backoff.reset();
                        }
                        (
                            report.interrupted,
                            !report.wrong_url.is_empty(),
                            report.window.flatten(),
                        )
                    }
                    Err(Unbuilt::State(e)) => {
                        log::error!("{e}; nothing is pushed until this is fixed");
                        notify::status(&e);
                        (Some(Interruption::State(e)), false, None)
                    }
                    Err(Unbuilt::Owned(line)) => {
                        log::error!("{line}");
                        shared.stop.store(true, Ordering::Relaxed);
                        let _ = main.send(Wake::Stop);
                        return EXIT_FAILED_ROWS;
                    }
                };
                match self.next_delay(interrupted.as_ref(), wrong_url) {
                    // Media waiting for a window go when it opens, not an interval later.
                    Some(delay) => window.map_or(delay, |opens_in| delay.min(opens_in)),
                    None => break,
                }
            } else {
                self.settings.interval
            };
            match wait(woken, delay) {
                LaneWake::Stop => break,
                LaneWake::SyncNow => {}
                LaneWake::Settings(new) => {
                    self.settings = *new;
                    self.pusher = None;
                    self.backoff = Backoff::new(&self.settings.retry);
                }
            }
        }
        if let (Lane::Events, Some(p)) = (self.lane, self.pusher.as_mut()) {
            log_totals(p);
        }
        EXIT_OK
    }

    /// One pass of the lane, its report logged and recorded for `relais status`.
    fn pass(&mut self, shared: &Shared) -> Result<CycleReport, Unbuilt> {
        if self.lane == Lane::Events {
            if let Some(jump) = self.clock_watch.jumped() {
                log_clock_jump(jump);
            }
        }
        let unlockable = {
            let mut lock = shared.lock.lock().unwrap_or_else(PoisonError::into_inner);
            hold_lock(&mut lock, &self.settings, shared.command, Duration::ZERO)
                .map_err(Unbuilt::Owned)?
        };
        if let Some(e) = unlockable {
            return Err(Unbuilt::State(e));
        }
        let pusher = match &mut self.pusher {
            Some(p) => p,
            None => self.pusher.insert(
                build_pusher(&self.settings, Some(self.lane), shared.stop.clone())
                    .map_err(Unbuilt::State)?,
            ),
        };
        let report = pusher.sync_once();
        log_report(&report);
        status::record_cycle(pusher.tracking(), &report, self.lane);
        notify::status(&report.to_string());
        match self.lane {
            Lane::Media => {
                *shared
                    .media_pass
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(heartbeat::pass_of(&report));
            }
            Lane::Events => {
                let media = shared
                    .media_pass
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                self.heartbeats
                    .after_pass(&self.settings, pusher, &report, media);
            }
        }
        Ok(report)
    }

    /// The wait before the next pass; `None` after a shutdown.
    fn next_delay(
        &mut self,
        interrupted: Option<&Interruption>,
        wrong_url: bool,
    ) -> Option<Duration> {
        let delay = match interrupted {
            Some(Interruption::Shutdown) => return None,
            Some(Interruption::Backend { retry_after, .. }) => {
                self.backoff.next_delay(*retry_after)
            }
            Some(Interruption::State(_)) => {
                // Reopen the state database next time: the failure may have left the
                // connection unusable (file removed, disk remounted read-only).
                self.pusher = None;
                self.backoff.next_delay(None)
            }
            // A backend that looks misconfigured may be fixed on its side: try again
            // sooner than the interval, and less and less often.
            None if wrong_url => self.backoff.next_delay(None),
            None => {
                self.backoff.reset();
                self.settings.interval
            }
        };
        if interrupted.is_some() || wrong_url {
            log::info!(
                "{} lane: next attempt in {}",
                self.lane.name(),
                clock::human_duration(delay)
            );
        }
        Some(delay)
    }
}

/// Starts the configuration pull on its own thread, with its own HTTP agent, so that a
/// hanging config endpoint never holds up the push and a long upload never delays a
/// due pull. The thread is not joined on stop: a pull in flight may take as long as the
/// HTTP timeouts, and abandoning it is safe (the file is replaced atomically).
fn start_pull(settings: &Settings) -> Option<(Sender<PullWake>, PullActivity)> {
    settings.site_token.as_ref()?;
    let (tx, rx) = mpsc::channel();
    let s = settings.clone();
    let activity = PullActivity::default();
    let busy = activity.clone();
    match std::thread::Builder::new()
        .name("config-pull".into())
        .spawn(move || pull::run_loop(s, rx, busy))
    {
        Ok(_) => Some((tx, activity)),
        Err(e) => {
            log::error!("config pull: cannot start its thread: {e}; configuration pull disabled");
            None
        }
    }
}

/// SIGHUP: the settings read again. The environment is the process's own and cannot have
/// changed, so what can is the `RELAIS_CONFIG` file. Invalid new settings leave the ones in
/// use in place, with one error line. Valid ones apply from the next pass, which starts
/// at once; the configuration pull is restarted when its settings changed. The state
/// directory (its lock is held for the process's life) and the log settings (the logger
/// is installed once) change only at a restart and are kept, with a warning.
fn reload(current: &Settings, load: Load, pull: &PullHandle) -> Option<Settings> {
    let mut new = match load() {
        Ok(s) => s,
        Err(e) => {
            log::error!("reload: the settings in use are kept: {e}");
            return None;
        }
    };
    new.register_secrets();
    let mut kept = Vec::new();
    if new.state_dir != current.state_dir {
        kept.push("the state directory");
        new.state_dir = current.state_dir.clone();
    }
    if new.log != current.log {
        kept.push("the log settings");
        new.log = current.log.clone();
    }
    if !kept.is_empty() {
        log::warn!(
            "reload: {} change only at a restart; kept as they were",
            kept.join(" and ")
        );
    }
    if pull_settings_changed(current, &new) {
        let mut slot = pull.lock().unwrap_or_else(PoisonError::into_inner);
        // A pull in flight finishes first (bounded by its timeouts), then its thread ends.
        if let Some((old, _)) = slot.take() {
            let _ = old.send(PullWake::Stop);
        }
        *slot = start_pull(&new);
        if slot.is_none() {
            log::info!("reload: configuration pull off");
        }
    }
    log::info!(
        "reload: settings read again: {} tables, batch size {}, a pass every {}; a pass with them starts now",
        new.tables.len(),
        new.batch_size,
        clock::human_duration(new.interval)
    );
    Some(new)
}

/// Whether the configuration pull must start again: it reads these when it starts.
fn pull_settings_changed(a: &Settings, b: &Settings) -> bool {
    a.site_token != b.site_token
        || a.http != b.http
        || a.agent_config != b.agent_config
        || a.config_interval != b.config_interval
        || a.config_max_bytes != b.config_max_bytes
        || a.config_pull_timeout != b.config_pull_timeout
        || a.on_config_change != b.on_config_change
}

/// `relais once` pulls the configuration once, after its push pass; returns the exit code:
/// a failed fetch and a hook still due both fail it.
fn pull_once(settings: &Settings) -> i32 {
    if settings.site_token.is_none() {
        return EXIT_OK;
    }
    match pull::Puller::for_once(settings) {
        Ok(mut p) => {
            p.pull_once();
            if p.status().last_sync_ok {
                EXIT_OK
            } else {
                EXIT_FAILED_ROWS
            }
        }
        Err(e) => {
            log::error!("{e}");
            EXIT_FAILED_ROWS
        }
    }
}

/// `relais once` succeeds only when nothing is left to push: every lane's pass was clean
/// and no tracked row is still waiting (a rejected row not yet due for its retry). Rows
/// the application wrote after the pass read its tables are the next pass's, not a
/// failure; but when a pass failed, the line counts them too, as after an outage most of
/// the backlog was never read.
fn once_exit_code(settings: &Settings, reports: &[CycleReport], pusher: &mut Pusher) -> i32 {
    match pusher.tracking().unsynced() {
        Ok(0) if reports.iter().all(CycleReport::is_clean) => return EXIT_OK,
        Ok(_) => {}
        Err(e) => {
            log::error!("{e}");
            return EXIT_FAILED_ROWS;
        }
    }
    // Counting what was never read opens every source: only worth it for the line.
    match backlog::measure(pusher.tracking(), settings) {
        Ok(b) if b.total() > 0 => log::warn!("{b} (relais status lists them)"),
        Ok(_) => {}
        Err(e) => log::error!("{e}"),
    }
    EXIT_FAILED_ROWS
}

/// Takes the state lock unless this process holds it already, waiting up to `wait`.
/// `Ok(None)`: held. `Ok(Some(error))`: the lock file cannot be opened (an unwritable
/// state directory), a state failure like the others, tried again later. `Err(line)`:
/// another process owns the state directory; the line says who and what to do.
fn hold_lock(
    lock: &mut Option<StateLock>,
    settings: &Settings,
    command: &str,
    wait: Duration,
) -> Result<Option<String>, String> {
    if lock.is_some() {
        return Ok(None);
    }
    let on_wait = |busy: &LockError| {
        log::info!("{busy}; waiting up to {}", clock::human_duration(wait));
    };
    match state_lock::acquire_waiting(&settings.state_dir, command, wait, on_wait) {
        Ok(held) => {
            *lock = Some(held);
            Ok(None)
        }
        Err(busy @ LockError::Busy { .. }) => Err(busy.explain(command)),
        Err(e) => Ok(Some(e.to_string())),
    }
}

/// Sleeps until `delay` has passed or something wakes the loop. Under a systemd
/// watchdog it wakes every half period to ping it; otherwise it never wakes on its own.
fn wait(rx: &Receiver<LaneWake>, delay: Duration) -> LaneWake {
    let deadline = Instant::now() + delay;
    loop {
        notify::keepalive();
        let left = deadline.saturating_duration_since(Instant::now());
        let nap = notify::watchdog_period().map_or(left, |p| left.min(p / 2));
        match rx.recv_timeout(nap) {
            Ok(w) => return w,
            Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                return LaneWake::SyncNow;
            }
            Err(RecvTimeoutError::Timeout) => {}
            // The dispatcher is gone: nothing can ask for a stop any more, so keep going.
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(left);
                return LaneWake::SyncNow;
            }
        }
    }
}

/// Turns signals into wake-ups on a dedicated thread that blocks in `read`, so the
/// agent has no timer ticking while idle.
fn watch_signals(
    tx: Sender<Wake>,
    pull: PullHandle,
    stop: Arc<AtomicBool>,
    once: bool,
) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP])?;
    let pull_wake = {
        let pull = pull.clone();
        move |w: PullWake| {
            if let Some((p, _)) = pull.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
                let _ = p.send(w);
            }
        }
    };
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for sig in signals.forever() {
            if sig == SIGUSR1 {
                let activity = pull
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                    .map(|(_, activity)| activity.clone());
                let pulled = activity.as_ref().map_or_else(
                    || "and a configuration pull now".to_string(),
                    PullActivity::on_request,
                );
                log::info!("SIGUSR1: starting a pass {pulled}");
                let _ = tx.send(Wake::SyncNow);
                pull_wake(PullWake::Now);
                continue;
            }
            if sig == SIGHUP && !once {
                log::info!("SIGHUP: reading the settings again, opening the log file anew");
                crate::logging::reopen();
                let _ = tx.send(Wake::Reload);
                continue;
            }
            log::info!("stop requested (signal {sig}); finishing the current step");
            stop.store(true, Ordering::Relaxed);
            pull_wake(PullWake::Stop);
            let _ = tx.send(Wake::Stop);
            std::thread::sleep(STOP_GRACE);
            log::warn!("still busy {} after the stop request (network stalled?); exiting now, the row in flight stays pending", clock::human_duration(STOP_GRACE));
            std::process::exit(EXIT_OK);
        }
    })?;
    Ok(())
}

/// Waits are timed by the monotonic clock and are unaffected; what the jump changes is
/// worth a line for whoever reads the journal.
fn log_clock_jump(seconds: i64) {
    log::warn!(
        "clock: the wall clock jumped {} by {} s ({:.1} days) between two passes (NTP or a manual change); sync dates on one side of the jump are off by that much, retry times too far ahead are due now",
        if seconds > 0 { "forward" } else { "back" },
        seconds.unsigned_abs(),
        seconds.unsigned_abs() as f64 / 86_400.0
    );
}

/// Logs a pass's problems and its report, as `relais run` and `relais once` do.
pub fn log_report(report: &CycleReport) {
    for e in &report.errors {
        log::error!("{e}");
    }
    if report.has_problems() {
        log::warn!("{report}");
    } else {
        log::info!("{report}");
    }
}

/// The seed prints statistics per table and status when it stops.
fn log_totals(pusher: &mut Pusher) {
    match pusher.tracking().counts() {
        Ok(counts) => {
            for c in counts {
                log::info!(
                    "statistics: {} {:<12} {:<8} {:>8}",
                    c.source,
                    c.table,
                    c.status,
                    c.rows
                );
            }
        }
        Err(e) => log::error!("{e}"),
    }
}
