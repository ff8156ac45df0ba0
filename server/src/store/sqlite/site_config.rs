//! The configuration backend on SQLite: the named queries over `sites` and `devices`
//! (migration 0002) and the transactions of [`crate::store::Store`]'s configuration
//! methods. What a change means is common code ([`crate::site_config`]); this file is
//! the SQL and the order of the statements. Every write runs in an IMMEDIATE
//! transaction, so reading the row it changes and recomputing the hash see no other
//! writer in between.

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use crate::site_config::{
    self, Device, DeviceFields, DevicePatch, NewDevice, NewSite, Site, SiteFields, SitePatch,
};
use crate::store::{CONFIG_VERSIONS_KEPT, ConfigVersion, Refused};

/// Now, ISO-8601 UTC with milliseconds and an explicit `+00:00` (seed 001's format).
macro_rules! now {
    () => {
        "strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')"
    };
}

const INSERT_SITE: &str = concat!(
    "INSERT INTO sites (name, token_sha256, timezone, doubt_after_days, ok_interval_s,
         ko_interval_s, config_version, config_updated_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ",
    now!(),
    ")
     ON CONFLICT (token_sha256) DO NOTHING
     RETURNING id"
);
const SELECT_SITE: &str = "SELECT id, name, timezone, doubt_after_days, ok_interval_s,
         ko_interval_s, config_version, config_updated_at
     FROM sites WHERE id = ?1";
const SELECT_SITES: &str = "SELECT id, name, timezone, doubt_after_days, ok_interval_s,
         ko_interval_s, config_version, config_updated_at
     FROM sites ORDER BY id";
const SELECT_SITE_BY_TOKEN: &str = "SELECT id, name, timezone, doubt_after_days,
         ok_interval_s, ko_interval_s, config_version, config_updated_at
     FROM sites WHERE token_sha256 = ?1";
const UPDATE_SITE: &str = "UPDATE sites SET name = ?2, timezone = ?3, doubt_after_days = ?4,
         ok_interval_s = ?5, ko_interval_s = ?6
     WHERE id = ?1";
const DELETE_SITE: &str = "DELETE FROM sites WHERE id = ?1";
/// Only when the hash moved: a change that leaves the configuration as it was keeps
/// the version and its date.
const BUMP_VERSION: &str = concat!(
    "UPDATE sites SET config_version = ?2, config_updated_at = ",
    now!(),
    " WHERE id = ?1 AND config_version <> ?2"
);

/// The version just recorded in `sites`, with the body it serves: its hash and time are
/// the site row's, so the history and `config_updated_at` agree.
const INSERT_VERSION: &str = "INSERT INTO config_versions (site_id, hash, body, created_at)
     SELECT id, config_version, ?2, config_updated_at FROM sites WHERE id = ?1";
const PRUNE_VERSIONS: &str = "DELETE FROM config_versions WHERE site_id = ?1 AND id NOT IN
     (SELECT id FROM config_versions WHERE site_id = ?1 ORDER BY id DESC LIMIT ?2)";
const SELECT_VERSIONS: &str = "SELECT id, hash, body, created_at FROM config_versions
     WHERE site_id = ?1 ORDER BY id DESC";

const INSERT_DEVICE: &str = "INSERT INTO devices (site_id, ip, name, building, floor, room,
         type, driver, driver_config, expectations)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
     ON CONFLICT (site_id, ip) DO NOTHING
     RETURNING id";
const SELECT_DEVICE: &str = "SELECT id, site_id, ip, name, building, floor, room, type,
         driver, driver_config, expectations
     FROM devices WHERE id = ?1";
const SELECT_DEVICES: &str = "SELECT id, site_id, ip, name, building, floor, room, type,
         driver, driver_config, expectations
     FROM devices ORDER BY id";
const SELECT_SITE_DEVICES: &str = "SELECT id, site_id, ip, name, building, floor, room,
         type, driver, driver_config, expectations
     FROM devices WHERE site_id = ?1 ORDER BY id";
const UPDATE_DEVICE: &str = "UPDATE devices SET ip = ?2, name = ?3, building = ?4,
         floor = ?5, room = ?6, type = ?7, driver = ?8, driver_config = ?9,
         expectations = ?10
     WHERE id = ?1";
const DELETE_DEVICE: &str = "DELETE FROM devices WHERE id = ?1 RETURNING site_id";

type Outcome<T> = rusqlite::Result<Result<T, Refused>>;

pub fn site_config(
    conn: &mut Connection,
    token_sha256: &str,
) -> rusqlite::Result<Option<(SiteFields, Vec<DeviceFields>)>> {
    // One read transaction: the site and its devices as of one moment.
    let tx = conn.transaction()?;
    let Some(site) = tx
        .query_row(SELECT_SITE_BY_TOKEN, [token_sha256], site_row)
        .optional()?
    else {
        return Ok(None);
    };
    let devices = query_devices(&tx, SELECT_SITE_DEVICES, Some(site.id))?;
    tx.commit()?;
    Ok(Some((
        site.fields,
        devices.into_iter().map(|d| d.fields).collect(),
    )))
}

pub fn create_site(conn: &mut Connection, new: &NewSite) -> Outcome<Site> {
    // A new site has no devices yet: its hash is known before the insert.
    let (hash, body) = site_config::served(&new.fields, &[]).map_err(hash_error)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let f = &new.fields;
    let id: Option<i64> = tx
        .query_row(
            INSERT_SITE,
            params![
                f.name,
                new.token_sha256,
                f.timezone,
                f.doubt_after_days,
                f.ok_interval_s,
                f.ko_interval_s,
                hash
            ],
            |r| r.get(0),
        )
        .optional()?;
    let Some(id) = id else {
        return Ok(Err(Refused::Duplicate));
    };
    tx.execute(INSERT_VERSION, params![id, body])?;
    let site = tx.query_row(SELECT_SITE, [id], site_row)?;
    tx.commit()?;
    Ok(Ok(site))
}

pub fn sites(conn: &mut Connection) -> rusqlite::Result<Vec<Site>> {
    let mut stmt = conn.prepare(SELECT_SITES)?;
    let rows = stmt.query_map([], site_row)?;
    rows.collect()
}

pub fn site(conn: &mut Connection, id: i64) -> Outcome<Site> {
    found(conn.query_row(SELECT_SITE, [id], site_row).optional()?)
}

pub fn update_site(conn: &mut Connection, id: i64, patch: &SitePatch) -> Outcome<Site> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(mut site) = tx.query_row(SELECT_SITE, [id], site_row).optional()? else {
        return Ok(Err(Refused::NotFound));
    };
    patch.apply(&mut site.fields);
    let f = &site.fields;
    tx.execute(
        UPDATE_SITE,
        params![
            id,
            f.name,
            f.timezone,
            f.doubt_after_days,
            f.ok_interval_s,
            f.ko_interval_s
        ],
    )?;
    refresh_version(&tx, id)?;
    let site = tx.query_row(SELECT_SITE, [id], site_row)?;
    tx.commit()?;
    Ok(Ok(site))
}

pub fn delete_site(conn: &mut Connection, id: i64) -> Outcome<()> {
    let deleted = conn.execute(DELETE_SITE, [id])?;
    Ok(if deleted == 0 {
        Err(Refused::NotFound)
    } else {
        Ok(())
    })
}

pub fn create_device(conn: &mut Connection, new: &NewDevice) -> Outcome<Device> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let f = &new.fields;
    let inserted = tx
        .query_row(
            INSERT_DEVICE,
            params![
                new.site_id,
                f.ip,
                f.name,
                f.building,
                f.floor,
                f.room,
                f.kind,
                f.driver,
                site_config::object_text(&f.driver_config),
                site_config::object_text(&f.expectations)
            ],
            |r| r.get::<_, i64>(0),
        )
        .optional();
    let id = match inserted {
        Ok(Some(id)) => id,
        Ok(None) => return Ok(Err(Refused::Duplicate)),
        Err(e) if is_constraint(&e, rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY) => {
            return Ok(Err(Refused::UnknownSite));
        }
        Err(e) => return Err(e),
    };
    refresh_version(&tx, new.site_id)?;
    let device = tx.query_row(SELECT_DEVICE, [id], device_row)?;
    tx.commit()?;
    Ok(Ok(device))
}

pub fn devices(conn: &mut Connection, site_id: Option<i64>) -> rusqlite::Result<Vec<Device>> {
    let sql = if site_id.is_some() {
        SELECT_SITE_DEVICES
    } else {
        SELECT_DEVICES
    };
    query_devices(conn, sql, site_id)
}

pub fn device(conn: &mut Connection, id: i64) -> Outcome<Device> {
    found(conn.query_row(SELECT_DEVICE, [id], device_row).optional()?)
}

pub fn update_device(conn: &mut Connection, id: i64, patch: &DevicePatch) -> Outcome<Device> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(mut device) = tx.query_row(SELECT_DEVICE, [id], device_row).optional()? else {
        return Ok(Err(Refused::NotFound));
    };
    patch.apply(&mut device.fields);
    let f = &device.fields;
    let updated = tx.execute(
        UPDATE_DEVICE,
        params![
            id,
            f.ip,
            f.name,
            f.building,
            f.floor,
            f.room,
            f.kind,
            f.driver,
            site_config::object_text(&f.driver_config),
            site_config::object_text(&f.expectations)
        ],
    );
    match updated {
        Ok(_) => {}
        Err(e) if is_constraint(&e, rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE) => {
            return Ok(Err(Refused::Duplicate));
        }
        Err(e) => return Err(e),
    }
    refresh_version(&tx, device.site_id)?;
    let device = tx.query_row(SELECT_DEVICE, [id], device_row)?;
    tx.commit()?;
    Ok(Ok(device))
}

pub fn delete_device(conn: &mut Connection, id: i64) -> Outcome<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let site_id: Option<i64> = tx.query_row(DELETE_DEVICE, [id], |r| r.get(0)).optional()?;
    let Some(site_id) = site_id else {
        return Ok(Err(Refused::NotFound));
    };
    refresh_version(&tx, site_id)?;
    tx.commit()?;
    Ok(Ok(()))
}

/// Recomputes the site's hash from its rows as they are now in this transaction and
/// records it, with the time and the body it serves (the history), when it moved.
fn refresh_version(conn: &Connection, site_id: i64) -> rusqlite::Result<()> {
    let site = conn.query_row(SELECT_SITE, [site_id], site_row)?;
    let devices: Vec<DeviceFields> = query_devices(conn, SELECT_SITE_DEVICES, Some(site_id))?
        .into_iter()
        .map(|d| d.fields)
        .collect();
    let (hash, body) = site_config::served(&site.fields, &devices).map_err(hash_error)?;
    if conn.execute(BUMP_VERSION, params![site_id, hash])? == 1 {
        conn.execute(INSERT_VERSION, params![site_id, body])?;
        conn.execute(PRUNE_VERSIONS, params![site_id, CONFIG_VERSIONS_KEPT])?;
    }
    Ok(())
}

pub fn config_versions(
    conn: &mut Connection,
    site_id: i64,
) -> rusqlite::Result<Vec<ConfigVersion>> {
    let mut stmt = conn.prepare(SELECT_VERSIONS)?;
    let rows = stmt.query_map([site_id], |r| {
        Ok(ConfigVersion {
            id: r.get(0)?,
            hash: r.get(1)?,
            body: r.get(2)?,
            created_at: r.get(3)?,
        })
    })?;
    rows.collect()
}

fn query_devices(
    conn: &Connection,
    sql: &str,
    site_id: Option<i64>,
) -> rusqlite::Result<Vec<Device>> {
    let mut stmt = conn.prepare(sql)?;
    let rows = match site_id {
        Some(site_id) => stmt.query_map([site_id], device_row)?,
        None => stmt.query_map([], device_row)?,
    };
    rows.collect()
}

fn found<T>(row: Option<T>) -> Outcome<T> {
    Ok(row.ok_or(Refused::NotFound))
}

fn site_row(r: &Row) -> rusqlite::Result<Site> {
    Ok(Site {
        id: r.get(0)?,
        fields: SiteFields {
            name: r.get(1)?,
            timezone: r.get(2)?,
            doubt_after_days: r.get(3)?,
            ok_interval_s: r.get(4)?,
            ko_interval_s: r.get(5)?,
        },
        config_version: r.get(6)?,
        config_updated_at: r.get(7)?,
    })
}

fn device_row(r: &Row) -> rusqlite::Result<Device> {
    Ok(Device {
        id: r.get(0)?,
        site_id: r.get(1)?,
        fields: DeviceFields {
            ip: r.get(2)?,
            name: r.get(3)?,
            building: r.get(4)?,
            floor: r.get(5)?,
            room: r.get(6)?,
            kind: r.get(7)?,
            driver: r.get(8)?,
            driver_config: object_column(r, 9)?,
            expectations: object_column(r, 10)?,
        },
    })
}

/// A JSON object column; anything else (a row edited by hand) is an error naming it.
fn object_column(r: &Row, idx: usize) -> rusqlite::Result<miniserde::json::Object> {
    let text: String = r.get(idx)?;
    site_config::object_of_text(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Text,
            "devices: driver_config and expectations must hold JSON objects".into(),
        )
    })
}

fn is_constraint(e: &rusqlite::Error, extended_code: std::ffi::c_int) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == extended_code)
}

fn hash_error(e: relais_wire::config_hash::HashError) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(e))
}
