//! `relais receiver [--listen ADDR] [--data DIR] [--no-idempotency]`: runs the
//! reference receiver in the foreground until the process is killed.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::{Receiver, ReceiverOptions};

const USAGE: &str = "usage: relais receiver [--listen ADDR] [--data DIR] [--no-idempotency]";

/// Runs the receiver command. `args` are the arguments after the `receiver`
/// subcommand (a leading `receiver` word is tolerated and skipped).
///
/// Prints exactly one line, `listening on http://IP:PORT`, on stdout once
/// bound, so a parent process can read the URL, then serves forever.
/// Returns 2 on bad arguments and 1 if the receiver cannot start.
pub fn run_cli(args: &[String]) -> i32 {
    let args = match args.first() {
        Some(first) if first == "receiver" => &args[1..],
        _ => args,
    };
    let opts = match parse_args(args) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            println!("{USAGE}");
            return 0;
        }
        Err(msg) => {
            eprintln!("relais receiver: {msg} ({USAGE})");
            return 2;
        }
    };
    let receiver = match Receiver::start(opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("relais receiver: cannot start: {e}");
            return 1;
        }
    };
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "listening on {}", receiver.url())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return 1;
    }
    drop(stdout);
    // Serving happens on the receiver's threads; this one only keeps the
    // receiver alive. Signals end the process with their default action.
    loop {
        std::thread::park();
    }
}

/// `Ok(None)` when help was asked for.
fn parse_args(args: &[String]) -> Result<Option<ReceiverOptions>, String> {
    let mut listen: Option<SocketAddr> = None;
    let mut data: Option<PathBuf> = None;
    let mut idempotency = true;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag {
            "--listen" => {
                let v = value("--listen")?;
                let addr = v
                    .parse()
                    .map_err(|_| format!("invalid --listen address {v:?} (want IP:PORT)"))?;
                listen = Some(addr);
            }
            "--data" => data = Some(PathBuf::from(value("--data")?)),
            "--no-idempotency" if inline.is_none() => idempotency = false,
            "-h" | "--help" => return Ok(None),
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    let data_dir = data.unwrap_or_else(default_data_dir);
    let mut opts = ReceiverOptions::new(data_dir);
    opts.idempotency = idempotency;
    if let Some(addr) = listen {
        opts.listen = addr;
    }
    Ok(Some(opts))
}

/// Without `--data`, a per-process directory under the system temp dir, so
/// that two receivers never share a database by accident.
fn default_data_dir() -> PathBuf {
    std::env::temp_dir().join(format!("relais-receiver-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_all_options() {
        let opts = parse_args(&args(&[
            "--listen",
            "0.0.0.0:8000",
            "--data=/tmp/x",
            "--no-idempotency",
        ]))
        .expect("valid")
        .expect("not help");
        assert_eq!(opts.listen, "0.0.0.0:8000".parse().expect("addr"));
        assert_eq!(opts.data_dir, PathBuf::from("/tmp/x"));
        assert!(!opts.idempotency);
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(parse_args(&args(&["--listen", "nope"])).is_err());
        assert!(parse_args(&args(&["--listen"])).is_err());
        assert!(parse_args(&args(&["--frobnicate"])).is_err());
        assert_eq!(run_cli(&args(&["receiver", "--bogus"])), 2);
    }
}
