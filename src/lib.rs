//! relais: pushes new rows of a device's SQLite database to a backend exactly once,
//! streams media BLOBs in bounded memory, and pulls the device configuration.
//!
//! The binary in `main.rs` is a thin command-line layer over these modules.

#[cfg(feature = "receiver")]
pub mod receiver;
