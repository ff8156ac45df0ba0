//! The configuration backend on PostgreSQL: the named queries over `sites` and `devices`
//! (migration 0002) and the transactions of [`crate::store::Store`]'s configuration
//! methods, statement for statement those of store/sqlite/site_config.rs. What a change
//! means is common code ([`crate::site_config`]).
//!
//! Where SQLite's IMMEDIATE transaction keeps every other writer out, here each write
//! first locks its site's row (`SELECT ... FOR UPDATE`, [`LOCK_SITE`]): two changes to
//! one site's devices cannot both recompute its hash from a snapshot missing the
//! other's change. Every write takes the site's lock before any device row, one order,
//! so two writes cannot deadlock (inserting a device first would: its foreign key check
//! holds a share lock on the site that the other insert's FOR UPDATE waits for).

use deadpool_postgres::{Client, GenericClient};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;

use super::{Fault, exec, first, rows};
use crate::site_config::{
    self, Device, DeviceFields, DevicePatch, NewDevice, NewSite, Site, SiteFields, SitePatch,
};
use crate::store::{CONFIG_VERSIONS_KEPT, ConfigVersion, Refused, StoreError};

/// The columns of a [`Site`]; `config_updated_at` as SQLite writes it: ISO-8601 UTC
/// with milliseconds and an explicit `+00:00` (seed 001's format).
macro_rules! site_columns {
    () => {
        "id, name, timezone, doubt_after_days, ok_interval_s, ko_interval_s, config_version,
         to_char(config_updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"+00:00\"')"
    };
}

/// The columns of a [`Device`]; the JSON objects as the text the server wrote.
macro_rules! device_columns {
    () => {
        "id, site_id, ip, name, building, floor, room, type, driver, driver_config::text,
         expectations::text"
    };
}

const INSERT_SITE: &str = concat!(
    "INSERT INTO sites (name, token_sha256, timezone, doubt_after_days, ok_interval_s,
         ko_interval_s, config_version, config_updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, now())
     ON CONFLICT (token_sha256) DO NOTHING
     RETURNING ",
    site_columns!()
);
const SELECT_SITE: &str = concat!("SELECT ", site_columns!(), " FROM sites WHERE id = $1");
/// Taken by every write before it reads what it changes (see the module doc).
const LOCK_SITE: &str = concat!(
    "SELECT ",
    site_columns!(),
    " FROM sites WHERE id = $1 FOR UPDATE"
);
const SELECT_SITES: &str = concat!("SELECT ", site_columns!(), " FROM sites ORDER BY id");
const SELECT_SITE_BY_TOKEN: &str = concat!(
    "SELECT ",
    site_columns!(),
    " FROM sites WHERE token_sha256 = $1"
);
const UPDATE_SITE: &str = "UPDATE sites SET name = $2, timezone = $3, doubt_after_days = $4,
         ok_interval_s = $5, ko_interval_s = $6
     WHERE id = $1";
const DELETE_SITE: &str = "DELETE FROM sites WHERE id = $1";
/// Only when the hash moved: a change that leaves the configuration as it was keeps
/// the version and its date.
const BUMP_VERSION: &str = "UPDATE sites SET config_version = $2, config_updated_at = now()
     WHERE id = $1 AND config_version <> $2";

/// The version just recorded in `sites`, with the body it serves: its hash and time are
/// the site row's, so the history and `config_updated_at` agree.
const INSERT_VERSION: &str = "INSERT INTO config_versions (site_id, hash, body, created_at)
     SELECT id, config_version, $2, config_updated_at FROM sites WHERE id = $1";
const PRUNE_VERSIONS: &str = "DELETE FROM config_versions WHERE site_id = $1 AND id NOT IN
     (SELECT id FROM config_versions WHERE site_id = $1 ORDER BY id DESC LIMIT $2)";
const SELECT_VERSIONS: &str = "SELECT id, hash, body,
         to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"+00:00\"')
     FROM config_versions WHERE site_id = $1 ORDER BY id DESC";

const INSERT_DEVICE: &str = "INSERT INTO devices (site_id, ip, name, building, floor, room,
         type, driver, driver_config, expectations)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::json, $10::text::json)
     ON CONFLICT (site_id, ip) DO NOTHING
     RETURNING id";
const SELECT_DEVICE: &str = concat!("SELECT ", device_columns!(), " FROM devices WHERE id = $1");
const LOCK_DEVICE: &str = concat!(
    "SELECT ",
    device_columns!(),
    " FROM devices WHERE id = $1 FOR UPDATE"
);
/// A device never changes site, so its site read before the lock stays true.
const SITE_OF_DEVICE: &str = "SELECT site_id FROM devices WHERE id = $1";
const SELECT_DEVICES: &str = concat!("SELECT ", device_columns!(), " FROM devices ORDER BY id");
const SELECT_SITE_DEVICES: &str = concat!(
    "SELECT ",
    device_columns!(),
    " FROM devices WHERE site_id = $1 ORDER BY id"
);
const UPDATE_DEVICE: &str = "UPDATE devices SET ip = $2, name = $3, building = $4,
         floor = $5, room = $6, type = $7, driver = $8, driver_config = $9::text::json,
         expectations = $10::text::json
     WHERE id = $1";
const DELETE_DEVICE: &str = "DELETE FROM devices WHERE id = $1";

type Outcome<T> = Result<Result<T, Refused>, Fault>;

pub async fn site_config(
    client: &mut Client,
    token_sha256: &str,
) -> Result<Option<(SiteFields, Vec<DeviceFields>)>, Fault> {
    // One snapshot for both reads: the site and its devices as of one moment
    // (READ COMMITTED would give each statement its own).
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let Some(site) = first(&tx, SELECT_SITE_BY_TOKEN, &[&token_sha256]).await? else {
        return Ok(None);
    };
    let site = site_row(&site);
    let devices = site_devices(&tx, site.id).await?;
    tx.commit().await?;
    Ok(Some((site.fields, devices)))
}

pub async fn create_site(client: &mut Client, new: &NewSite) -> Outcome<Site> {
    // A new site has no devices yet: its hash is known before the insert.
    let (hash, body) = site_config::served(&new.fields, &[]).map_err(hash_error)?;
    let f = &new.fields;
    let tx = client.transaction().await?;
    let row = first(
        &tx,
        INSERT_SITE,
        &[
            &f.name,
            &new.token_sha256,
            &f.timezone,
            &f.doubt_after_days,
            &f.ok_interval_s,
            &f.ko_interval_s,
            &hash,
        ],
    )
    .await?;
    let Some(site) = row.map(|r| site_row(&r)) else {
        return Ok(Err(Refused::Duplicate));
    };
    exec(&tx, INSERT_VERSION, &[&site.id, &body]).await?;
    tx.commit().await?;
    Ok(Ok(site))
}

pub async fn sites(client: &Client) -> Result<Vec<Site>, Fault> {
    Ok(rows(client, SELECT_SITES, &[])
        .await?
        .iter()
        .map(site_row)
        .collect())
}

pub async fn site(client: &Client, id: i64) -> Outcome<Site> {
    let row = first(client, SELECT_SITE, &[&id]).await?;
    Ok(row.map(|r| site_row(&r)).ok_or(Refused::NotFound))
}

pub async fn update_site(client: &mut Client, id: i64, patch: &SitePatch) -> Outcome<Site> {
    let tx = client.transaction().await?;
    let Some(row) = first(&tx, LOCK_SITE, &[&id]).await? else {
        return Ok(Err(Refused::NotFound));
    };
    let mut site = site_row(&row);
    patch.apply(&mut site.fields);
    let f = &site.fields;
    exec(
        &tx,
        UPDATE_SITE,
        &[
            &id,
            &f.name,
            &f.timezone,
            &f.doubt_after_days,
            &f.ok_interval_s,
            &f.ko_interval_s,
        ],
    )
    .await?;
    refresh_version(&tx, id).await?;
    let site = read_site(&tx, id).await?;
    tx.commit().await?;
    Ok(Ok(site))
}

pub async fn delete_site(client: &Client, id: i64) -> Outcome<()> {
    // One statement: the devices go with it (ON DELETE CASCADE), after any write
    // holding the site's lock.
    let deleted = exec(client, DELETE_SITE, &[&id]).await?;
    Ok(if deleted == 0 {
        Err(Refused::NotFound)
    } else {
        Ok(())
    })
}

pub async fn create_device(client: &mut Client, new: &NewDevice) -> Outcome<Device> {
    let tx = client.transaction().await?;
    // Locked, the site cannot go before the commit, so the foreign key holds.
    if first(&tx, LOCK_SITE, &[&new.site_id]).await?.is_none() {
        return Ok(Err(Refused::UnknownSite));
    }
    let f = &new.fields;
    let (driver_config, expectations) = object_texts(f);
    let inserted = first(
        &tx,
        INSERT_DEVICE,
        &[
            &new.site_id,
            &f.ip,
            &f.name,
            &f.building,
            &f.floor,
            &f.room,
            &f.kind,
            &f.driver,
            &driver_config,
            &expectations,
        ],
    )
    .await?;
    let Some(row) = inserted else {
        return Ok(Err(Refused::Duplicate));
    };
    let id: i64 = row.get(0);
    refresh_version(&tx, new.site_id).await?;
    let device = read_device(&tx, id).await?;
    tx.commit().await?;
    Ok(Ok(device))
}

pub async fn devices(client: &Client, site_id: Option<i64>) -> Result<Vec<Device>, Fault> {
    let found = match site_id {
        Some(site_id) => rows(client, SELECT_SITE_DEVICES, &[&site_id]).await?,
        None => rows(client, SELECT_DEVICES, &[]).await?,
    };
    found.iter().map(device_row).collect()
}

pub async fn device(client: &Client, id: i64) -> Outcome<Device> {
    match first(client, SELECT_DEVICE, &[&id]).await? {
        Some(row) => Ok(Ok(device_row(&row)?)),
        None => Ok(Err(Refused::NotFound)),
    }
}

pub async fn update_device(client: &mut Client, id: i64, patch: &DevicePatch) -> Outcome<Device> {
    let tx = client.transaction().await?;
    let Some(site_id) = lock_site_of_device(&tx, id).await? else {
        return Ok(Err(Refused::NotFound));
    };
    let Some(row) = first(&tx, LOCK_DEVICE, &[&id]).await? else {
        return Ok(Err(Refused::NotFound));
    };
    let mut device = device_row(&row)?;
    patch.apply(&mut device.fields);
    let f = &device.fields;
    let (driver_config, expectations) = object_texts(f);
    let updated = exec(
        &tx,
        UPDATE_DEVICE,
        &[
            &id,
            &f.ip,
            &f.name,
            &f.building,
            &f.floor,
            &f.room,
            &f.kind,
            &f.driver,
            &driver_config,
            &expectations,
        ],
    )
    .await;
    match updated {
        Ok(_) => {}
        // The UNIQUE (site_id, ip) constraint decides; the transaction is rolled back.
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Ok(Err(Refused::Duplicate));
        }
        Err(e) => return Err(e.into()),
    }
    refresh_version(&tx, site_id).await?;
    let device = read_device(&tx, id).await?;
    tx.commit().await?;
    Ok(Ok(device))
}

pub async fn delete_device(client: &mut Client, id: i64) -> Outcome<()> {
    let tx = client.transaction().await?;
    let Some(site_id) = lock_site_of_device(&tx, id).await? else {
        return Ok(Err(Refused::NotFound));
    };
    if exec(&tx, DELETE_DEVICE, &[&id]).await? == 0 {
        return Ok(Err(Refused::NotFound));
    }
    refresh_version(&tx, site_id).await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// Locks the site of device `id`; `None` when there is no such device (or its site
/// was just deleted, and the device with it).
async fn lock_site_of_device(tx: &impl GenericClient, id: i64) -> Result<Option<i64>, Fault> {
    let Some(row) = first(tx, SITE_OF_DEVICE, &[&id]).await? else {
        return Ok(None);
    };
    let site_id: i64 = row.get(0);
    Ok(first(tx, LOCK_SITE, &[&site_id]).await?.map(|_| site_id))
}

/// Recomputes the site's hash from its rows as they are now in this transaction and
/// records it, with the time and the body it serves (the history), when it moved.
async fn refresh_version(tx: &impl GenericClient, site_id: i64) -> Result<(), Fault> {
    let site = read_site(tx, site_id).await?;
    let devices = site_devices(tx, site_id).await?;
    let (hash, body) = site_config::served(&site.fields, &devices).map_err(hash_error)?;
    if exec(tx, BUMP_VERSION, &[&site_id, &hash]).await? == 1 {
        exec(tx, INSERT_VERSION, &[&site_id, &body]).await?;
        exec(tx, PRUNE_VERSIONS, &[&site_id, &CONFIG_VERSIONS_KEPT]).await?;
    }
    Ok(())
}

pub async fn config_versions(client: &Client, site_id: i64) -> Result<Vec<ConfigVersion>, Fault> {
    Ok(rows(client, SELECT_VERSIONS, &[&site_id])
        .await?
        .iter()
        .map(|r| ConfigVersion {
            id: r.get(0),
            hash: r.get(1),
            body: r.get(2),
            created_at: r.get(3),
        })
        .collect())
}

/// A row this transaction holds (locked, or just written).
async fn read_site(tx: &impl GenericClient, id: i64) -> Result<Site, Fault> {
    let row = first(tx, SELECT_SITE, &[&id]).await?;
    row.map(|r| site_row(&r))
        .ok_or_else(|| vanished(&format!("site {id}")))
}

async fn read_device(tx: &impl GenericClient, id: i64) -> Result<Device, Fault> {
    match first(tx, SELECT_DEVICE, &[&id]).await? {
        Some(row) => device_row(&row),
        None => Err(vanished(&format!("device {id}"))),
    }
}

async fn site_devices(c: &impl GenericClient, site_id: i64) -> Result<Vec<DeviceFields>, Fault> {
    rows(c, SELECT_SITE_DEVICES, &[&site_id])
        .await?
        .iter()
        .map(|r| device_row(r).map(|d| d.fields))
        .collect()
}

fn object_texts(f: &DeviceFields) -> (String, String) {
    (
        site_config::object_text(&f.driver_config),
        site_config::object_text(&f.expectations),
    )
}

fn site_row(r: &Row) -> Site {
    Site {
        id: r.get(0),
        fields: SiteFields {
            name: r.get(1),
            timezone: r.get(2),
            doubt_after_days: r.get(3),
            ok_interval_s: r.get(4),
            ko_interval_s: r.get(5),
        },
        config_version: r.get(6),
        config_updated_at: r.get(7),
    }
}

fn device_row(r: &Row) -> Result<Device, Fault> {
    Ok(Device {
        id: r.get(0),
        site_id: r.get(1),
        fields: DeviceFields {
            ip: r.get(2),
            name: r.get(3),
            building: r.get(4),
            floor: r.get(5),
            room: r.get(6),
            kind: r.get(7),
            driver: r.get(8),
            driver_config: object_column(r, 9)?,
            expectations: object_column(r, 10)?,
        },
    })
}

/// A JSON object column; anything else (a row edited by hand) is an error naming it.
fn object_column(r: &Row, idx: usize) -> Result<miniserde::json::Object, Fault> {
    site_config::object_of_text(r.get(idx)).ok_or_else(|| {
        Fault::Store(StoreError::Failed(
            "devices: driver_config and expectations must hold JSON objects".into(),
        ))
    })
}

fn hash_error(e: relais_wire::config_hash::HashError) -> Fault {
    Fault::Store(StoreError::Failed(e.to_string()))
}

/// A row gone inside the transaction that locked or wrote it: a bug, not a request's
/// problem.
fn vanished(what: &str) -> Fault {
    Fault::Store(StoreError::Failed(format!(
        "configuration: {what} vanished inside its own transaction"
    )))
}
