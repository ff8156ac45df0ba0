//! relais-server in-process, for the agent's tests, demo and benchmarks: the real
//! router on the embedded SQLite store, as `relais-server --no-auth` would serve it,
//! on 127.0.0.1 and a free port, run by its own tokio runtime on a background thread.
//! The API is synchronous: its users have no async runtime of their own.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use clap::Parser as _;
use tokio::sync::oneshot;

use crate::cli::Cli;
use crate::config::Config;
use crate::http;

/// How long requests in flight may take to finish once [`EmbeddedServer::shutdown`] is
/// called (a test ends with nothing in flight; an agent still uploading is not waited
/// for longer).
const SHUTDOWN_GRACE_S: &str = "2";

/// A running server; [`EmbeddedServer::shutdown`] or dropping it stops it.
#[derive(Debug)]
pub struct EmbeddedServer {
    addr: SocketAddr,
    store_path: PathBuf,
    media_dir: PathBuf,
    requests: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl EmbeddedServer {
    /// Serves the store `dir/store.db` and the media directory `dir/media` (`dir` and
    /// both created if missing, the store migrated); returns once it listens.
    pub fn start(dir: &Path) -> Result<EmbeddedServer, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let store_path = dir.join("store.db");
        let media_dir = dir.join("media");
        let mut store = OsString::from("sqlite:");
        store.push(&store_path);
        let args: [OsString; 10] = [
            "relais-server".into(),
            "--no-auth".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--store".into(),
            store,
            "--media-dir".into(),
            media_dir.clone().into(),
            "--shutdown-grace-s".into(),
            SHUTDOWN_GRACE_S.into(),
        ];
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        let config = Config::from_cli(&cli)?;
        let requests = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&requests);
        let router = crate::open_router(&config)?.layer(axum::middleware::map_request(
            move |req: axum::extract::Request| {
                counted.fetch_add(1, Ordering::Relaxed);
                async move { req }
            },
        ));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("relais-server")
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let listener = std::net::TcpListener::bind(config.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("listen: {}: {e}", config.listen))?;
        let addr = listener.local_addr().map_err(|e| format!("listen: {e}"))?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(|e| format!("listen: {e}"))?
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let grace = config.shutdown_grace;
        let thread = std::thread::Builder::new()
            .name("relais-server".into())
            .spawn(move || {
                let served = runtime.block_on(http::serve(listener, router, grace, async {
                    // A dropped sender stops the server too.
                    let _ = stopped.await;
                    Ok(())
                }));
                // Whatever the grace period left running is abandoned, not waited for.
                runtime.shutdown_timeout(Duration::from_secs(1));
                served
            })
            .map_err(|e| format!("server thread: {e}"))?;
        Ok(EmbeddedServer {
            addr,
            store_path,
            media_dir,
            requests,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The store's SQLite file: its `received` table and views are what arrived.
    pub fn store_path(&self) -> &Path {
        &self.store_path
    }

    /// The directory the `media` view's `media_path` is relative to.
    pub fn media_dir(&self) -> &Path {
        &self.media_dir
    }

    /// HTTP requests the router received since start, whatever their outcome.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Stops accepting, lets requests in flight finish (2 s at most) and returns how
    /// serving ended.
    pub fn shutdown(mut self) -> Result<(), String> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), String> {
        drop(self.stop.take());
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| "serve: the server thread panicked".to_string())?,
            None => Ok(()),
        }
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
