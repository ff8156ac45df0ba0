//! The uplink's lanes. Event tables and media tables are pushed by two loops of their
//! own ([`crate::daemon`]), each with its own pusher, HTTP connections and backoff, so
//! that an event recorded during a ten-minute video upload goes up within one push
//! interval, and a backend that fails or rejects media does not stop the events.
//!
//! A table's lane follows from its settings: a table with a BLOB is media. The lanes
//! share the state database (each with its own connection: SQLite serialises their short
//! write transactions), never a table, so the tracking of a row has one writer.

use std::borrow::Cow;

use crate::settings::{Settings, TableSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Events,
    Media,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Events, Lane::Media];

    pub fn of(table: &TableSpec) -> Lane {
        match table.blob {
            Some(_) => Lane::Media,
            None => Lane::Events,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Lane::Events => "events",
            Lane::Media => "media",
        }
    }

    /// The settings with this lane's tables only.
    pub fn settings(self, settings: &Settings) -> Settings {
        let mut own = settings.clone();
        own.tables.retain(|t| Lane::of(t) == self);
        own
    }

    /// Whether the lane has anything to push. The event lane always runs its passes: it
    /// also says what concerns every table (a source gone with unsynced rows).
    pub fn has_work(self, settings: &Settings) -> bool {
        self == Lane::Events || settings.tables.iter().any(|t| Lane::of(t) == self)
    }

    /// This lane's entry for an `agent_meta` key (the last pass, the last sweep). The
    /// event lane keeps the names of the time before lanes, so an upgraded agent finds
    /// its sweep done and `relais status` its last pass.
    pub fn meta_key(self, key: &str) -> Cow<'_, str> {
        match self {
            Lane::Events => Cow::Borrowed(key),
            Lane::Media => Cow::Owned(format!("{key}:media")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_lane_keeps_the_keys_of_the_time_before_lanes() {
        assert_eq!(Lane::Events.meta_key("last_cycle"), "last_cycle");
        assert_eq!(Lane::Media.meta_key("last_cycle"), "last_cycle:media");
    }
}
