//! A throwaway PostgreSQL cluster for the tests: `initdb` in a scratch directory (as
//! `nobody` when the tests run as root: PostgreSQL refuses root), its own free port on
//! 127.0.0.1 and its own unix socket directory, password authentication over TCP (so
//! the tests can check that a URL's password stays out of the logs). One shared cluster
//! per test binary ([`shared`]), one database per test ([`Cluster::create_db`]); a test
//! that stops PostgreSQL starts its own ([`Cluster::start`]).
//!
//! Without the binaries the PostgreSQL cases are skipped with a loud line, except under
//! `CI=true`, where that is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The superuser initdb creates; the tests connect as it.
const USER: &str = "postgres";
/// `nobody`/`nogroup` on Debian.
const NOBODY: u32 = 65534;

pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    password: String,
    as_nobody: bool,
    databases: AtomicU32,
}

/// The test binary's shared cluster, stopped and removed when the binary exits; `None`
/// (after a loud line) when PostgreSQL is not installed.
pub fn shared() -> Option<&'static Cluster> {
    static SHARED: OnceLock<Option<Cluster>> = OnceLock::new();
    extern "C" fn stop_shared() {
        if let Some(Some(cluster)) = SHARED.get() {
            cluster.remove();
        }
    }
    SHARED
        .get_or_init(|| {
            let cluster = Cluster::start()?;
            // SAFETY: registers a plain function; statics are not dropped at exit.
            unsafe { libc::atexit(stop_shared) };
            Some(cluster)
        })
        .as_ref()
}

impl Cluster {
    /// A new running cluster, or `None` (see the module doc) without the binaries.
    pub fn start() -> Option<Cluster> {
        Cluster::start_with("")
    }

    /// [`Cluster::start`] with `settings` (postgresql.conf lines) appended after the
    /// tests' own, so they win: the load benchmark turns durability back on.
    pub fn start_with(settings: &str) -> Option<Cluster> {
        let Some(bin) = find_bin() else {
            let reason = "PostgreSQL binaries (initdb, pg_ctl) not found via pg_config \
                          --bindir, /usr/lib/postgresql/*/bin or PATH; install Debian's \
                          postgresql package";
            super::skip_without("PostgreSQL", reason);
            return None;
        };
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "relais-server-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sock")).expect("cluster dir");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let cluster = Cluster {
            bin,
            port: free_port(),
            password: format!("pw-{}-{nanos:x}", std::process::id()),
            // SAFETY: geteuid has no preconditions.
            as_nobody: unsafe { libc::geteuid() } == 0,
            databases: AtomicU32::new(0),
            dir,
        };
        cluster.init(settings);
        cluster.resume();
        Some(cluster)
    }

    fn init(&self, settings: &str) {
        let pwfile = self.dir.join("pwfile");
        std::fs::write(&pwfile, &self.password).expect("pwfile");
        if self.as_nobody {
            for path in [&self.dir, &self.dir.join("sock"), &pwfile] {
                std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown");
            }
        }
        self.run(
            "initdb",
            &[
                "-D",
                &self.data().display().to_string(),
                "-U",
                USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                &format!("--pwfile={}", pwfile.display()),
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        // In the configuration file, so a restart keeps the same port and socket.
        let conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_connections = 300\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\n",
            self.port,
            self.dir.join("sock").display()
        );
        let path = self.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("postgresql.conf");
        text.push_str(&conf);
        text.push_str(settings);
        std::fs::write(&path, text).expect("postgresql.conf");
    }

    /// Starts the (stopped) cluster and waits until it accepts connections.
    pub fn resume(&self) {
        let log = self.dir.join("postgres.log").display().to_string();
        let data = self.data().display().to_string();
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-t", "60", "start"],
        );
    }

    /// Stops the cluster (fast: open connections are closed, as in a restart).
    pub fn stop(&self) {
        let data = self.data().display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// The URL of database `db` over TCP, with the password.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// A new empty database; returns its URL.
    pub fn create_db(&self) -> String {
        let name = format!("t{}", self.databases.fetch_add(1, Ordering::Relaxed));
        self.client("postgres")
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create database");
        self.url(&name)
    }

    pub fn client(&self, db: &str) -> postgres::Client {
        postgres::Client::connect(&self.url(db), postgres::NoTls).expect("connect to PostgreSQL")
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs a PostgreSQL program (as `nobody` when root); panics with its output if it
    /// fails.
    fn run(&self, program: &str, args: &[&str]) {
        if let Err(e) = self.exec(program, args) {
            panic!(
                "{e}\nlog: {}",
                std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
            );
        }
    }

    fn exec(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_nobody {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                "--",
            ])
            .arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{program} {args:?}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    fn remove(&self) {
        let data = self.data().display().to_string();
        // Ignored: it may be stopped already.
        let _ = self.exec("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.remove();
    }
}

fn find_bin() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .collect();
    // The newest first ("15" after "9" needs a numeric order).
    versioned.sort_by_key(|p| {
        let version = p.parent().and_then(|v| v.file_name());
        std::cmp::Reverse(version.and_then(|v| v.to_str()?.parse::<u32>().ok()))
    });
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    from_pg_config
        .into_iter()
        .chain(versioned)
        .chain(on_path)
        .find(|dir| has_tools(dir))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
