//! The default device id. The seed's default, `raspberry-1`, was the same on every
//! device: devices that never set `DEVICE_ID` pushed under the same idempotency keys,
//! and an idempotent backend answered the second device's rows from its replay cache,
//! keeping only the first one's. relais never uses a default shared by accident: it
//! derives one from the machine id that systemd gives every installation
//! (`/etc/machine-id`, 32 hex digits, made at first boot), or refuses to start.
//!
//! The machine id is meant to stay confidential (machine-id(5)), so it is never sent:
//! the default is `relais-` and the first 12 hex digits of the MD5 of an
//! application-specific string that contains it, as systemd's own application-specific
//! ids do with HMAC. 48 bits: two devices collide with odds of about 1 in 10^7 in a
//! fleet of 10,000.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Where the machine id is looked for, in order. The second is only read when the first
/// does not exist: an `/etc/machine-id` that is there but uninitialized means a first
/// boot or a cloned image, and a D-Bus copy next to it is most likely the image's.
pub const MACHINE_ID_FILES: [&str; 2] = ["/etc/machine-id", "/var/lib/dbus/machine-id"];

const SET_IT: &str = "set DEVICE_ID to a name unique to this device";

/// The derived device id and where it came from (`derived from /etc/machine-id`), or
/// why there is none. `file`, when given, replaces [`MACHINE_ID_FILES`] (tests, images).
pub fn derive(file: Option<&Path>) -> Result<(String, String), String> {
    let candidates: Vec<PathBuf> = match file {
        Some(f) => vec![f.to_path_buf()],
        None => MACHINE_ID_FILES.iter().map(PathBuf::from).collect(),
    };
    let mut missing = Vec::new();
    for path in &candidates {
        let shown = path.display();
        match read_small(path) {
            Ok(text) => {
                let id = check(text.trim())
                    .map_err(|why| format!("not set, and {shown} {why}; or {SET_IT}"))?;
                return Ok((from_machine_id(id), format!("derived from {shown}")));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(shown.to_string()),
            Err(e) => {
                return Err(format!(
                    "not set, and {shown} cannot be read ({e}): {SET_IT}"
                ));
            }
        }
    }
    Err(format!(
        "not set, and there is no machine id to derive one from ({} not found): {SET_IT}",
        missing.join(", ")
    ))
}

/// The default id of the device whose machine id is `machine_id` (32 hex digits).
pub fn from_machine_id(machine_id: &str) -> String {
    let text = format!("relais device id:{}", machine_id.to_ascii_lowercase());
    let digest = crate::config_hash::md5_hex(text.as_bytes());
    format!("relais-{}", &digest[..12])
}

/// A machine id is 128 bits in hex; systemd writes `uninitialized` (or leaves the file
/// empty) until first boot has set one, and an all-zero id is a placeholder.
fn check(text: &str) -> Result<&str, &'static str> {
    if text.is_empty() || text == "uninitialized" {
        return Err(
            "is not initialized (a first boot or a cloned image): run systemd-machine-id-setup",
        );
    }
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("does not hold a machine id (32 hexadecimal digits)");
    }
    if text.bytes().all(|b| b == b'0') {
        return Err(
            "holds the all-zero placeholder: give the device its own (systemd-machine-id-setup)",
        );
    }
    Ok(text)
}

/// The file's first bytes: a machine id is 33, so a wrong path never reads much.
fn read_small(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    File::open(path)?.take(256).read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_not_copied() {
        let machine = "3d1219c7c4c5404aaa1f6d2a48adfda4";
        let id = from_machine_id(machine);
        assert!(id.starts_with("relais-") && id.len() == 19, "{id}");
        assert!(
            !machine.contains(&id[7..]),
            "the machine id must not show through"
        );
        assert_eq!(id, from_machine_id(&machine.to_ascii_uppercase()));
        assert_ne!(id, from_machine_id("3d1219c7c4c5404aaa1f6d2a48adfda5"));
    }

    #[test]
    fn refuses_placeholders() {
        for bad in [
            "",
            "uninitialized",
            "00000000000000000000000000000000",
            "xyz",
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
    }
}
