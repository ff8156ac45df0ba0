//! What the relais agent and relais-server must agree on, in one place both use: the
//! push endpoints and header names, the payload members every push carries, the
//! idempotency key format (contract section 2), the configuration hash (section 3) and
//! the agents' heartbeat ([`heartbeat`]).
//!
//! Tiny and synchronous on purpose: the device build depends on it, so its only
//! dependency is miniserde.

pub mod config_hash;
pub mod heartbeat;
pub mod json;

/// The endpoint of sensor events.
pub const EVENTS_PATH: &str = "/api/evenements";
/// The endpoint of camera media.
pub const MEDIA_PATH: &str = "/api/media";
/// The request header naming a push, stable across retries and restarts.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";
/// The payload member naming the device that pushed the row.
pub const DEVICE_ID_MEMBER: &str = "device_id";
/// The payload member naming the pushing program, and its value (the seed's).
pub const SOURCE_MEMBER: &str = "source";
pub const SOURCE_VALUE: &str = "sync_service";

/// `<device_id>:<table>:<local_id>` as the contract fixes it. With several source files
/// (a glob), local ids repeat from file to file, so the table part also names the file
/// (`<device_id>:<table>@<file>:<local_id>`); otherwise the backend would take rows of
/// different days for replays of each other and drop them.
pub fn idempotency_key(device_id: &str, table: &str, file: Option<&str>, local_id: &str) -> String {
    match file {
        Some(file) => format!("{device_id}:{table}@{file}:{local_id}"),
        None => format!("{device_id}:{table}:{local_id}"),
    }
}

/// The local id part of an idempotency key: what follows its last `:` (a device id may
/// contain `:`, a local id written by the agent does not). `None` without any `:`.
pub fn local_id_of(key: &str) -> Option<&str> {
    key.rsplit_once(':').map(|(_, id)| id)
}

/// `bytes` in lowercase hex (digests, tokens). A table lookup: the server hexes two
/// digests per push, and `format!` per byte was a percent of its CPU time.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_their_local_id() {
        let plain = idempotency_key("pi:7", "evenement", None, "42");
        assert_eq!(plain, "pi:7:evenement:42");
        assert_eq!(local_id_of(&plain), Some("42"));
        let glob = idempotency_key("pi", "media", Some("2025_12_18.db"), "3");
        assert_eq!(glob, "pi:media@2025_12_18.db:3");
        assert_eq!(local_id_of(&glob), Some("3"));
        assert_eq!(local_id_of("no-colon"), None);
    }
}
