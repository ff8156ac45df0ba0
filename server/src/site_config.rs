//! Seed 001's configuration backend, the part both stores share: the site and device
//! records, the configuration served at `GET /config/{site_token}` (contract section 3)
//! and its hash, and the JSON the admin API answers with. The stores keep the rows and
//! call [`config_hash`] inside the transaction of every change; [`input`] turns admin
//! request bodies into the records, validated.
//!
//! The hash is seed 001's "Calcul du Hash": MD5 of Python's `json.dumps(sort_keys=True)`
//! of `{site_name, timezone, doubt_after_days, ok_interval_s, ko_interval_s,
//! devices: [{ip, name, building, floor, room, type, driver, driver_config,
//! expectations}]}`, through relais-wire's one serialiser. It covers that projection,
//! not the served object (which has `reporting`, `snmp` and `pjlink` instead), so it is
//! NOT what the agent's `config_hash::config_hash` gives over the body it receives. The
//! agent copes: it holds the file it wrote as intact because its bytes match the MD5 it
//! recorded (src/pull.rs, `inspect`), and compares the served hash as an opaque tag.

pub mod input;

use miniserde::json::{Number, Object, Value};

use relais_wire::config_hash::{HashError, md5_hex, python_dumps};

/// The drivers a device may use (seed 001).
pub const DRIVERS: &[&str] = &["ping", "snmp", "pjlink"];
/// The members of `driver_config`, each served as the device's member of that name
/// (`{}` when absent).
pub const DRIVER_CONFIG_MEMBERS: &[&str] = &["snmp", "pjlink"];

/// A site's own settings, as hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteFields {
    pub name: String,
    pub timezone: String,
    pub doubt_after_days: i64,
    pub ok_interval_s: i64,
    pub ko_interval_s: i64,
}

/// A stored site. Its token is not here: only the token's SHA-256 is stored, and it
/// is never answered after creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub id: i64,
    pub fields: SiteFields,
    pub config_version: String,
    pub config_updated_at: String,
}

/// A site about to be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSite {
    pub fields: SiteFields,
    pub token_sha256: String,
}

/// A partial update of a site: `None` members are left as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SitePatch {
    pub name: Option<String>,
    pub timezone: Option<String>,
    pub doubt_after_days: Option<i64>,
    pub ok_interval_s: Option<i64>,
    pub ko_interval_s: Option<i64>,
}

impl SitePatch {
    pub fn apply(&self, to: &mut SiteFields) {
        set(&mut to.name, &self.name);
        set(&mut to.timezone, &self.timezone);
        set(&mut to.doubt_after_days, &self.doubt_after_days);
        set(&mut to.ok_interval_s, &self.ok_interval_s);
        set(&mut to.ko_interval_s, &self.ko_interval_s);
    }
}

/// A device's configuration, as hashed. `driver_config` and `expectations` are JSON
/// objects (validated by [`input`]).
#[derive(Debug, Clone)]
pub struct DeviceFields {
    pub ip: String,
    pub name: String,
    pub building: String,
    pub floor: String,
    pub room: String,
    pub kind: String,
    pub driver: String,
    pub driver_config: Object,
    pub expectations: Object,
}

/// A stored device.
#[derive(Debug, Clone)]
pub struct Device {
    pub id: i64,
    pub site_id: i64,
    pub fields: DeviceFields,
}

/// A device about to be created.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub site_id: i64,
    pub fields: DeviceFields,
}

/// A partial update of a device: `None` members are left as they are. A device stays
/// on its site (`site_id` is not in it).
#[derive(Debug, Clone, Default)]
pub struct DevicePatch {
    pub ip: Option<String>,
    pub name: Option<String>,
    pub building: Option<String>,
    pub floor: Option<String>,
    pub room: Option<String>,
    pub kind: Option<String>,
    pub driver: Option<String>,
    pub driver_config: Option<Object>,
    pub expectations: Option<Object>,
}

impl DevicePatch {
    pub fn apply(&self, to: &mut DeviceFields) {
        set(&mut to.ip, &self.ip);
        set(&mut to.name, &self.name);
        set(&mut to.building, &self.building);
        set(&mut to.floor, &self.floor);
        set(&mut to.room, &self.room);
        set(&mut to.kind, &self.kind);
        set(&mut to.driver, &self.driver);
        set(&mut to.driver_config, &self.driver_config);
        set(&mut to.expectations, &self.expectations);
    }
}

fn set<T: Clone>(to: &mut T, from: &Option<T>) {
    if let Some(value) = from {
        *to = value.clone();
    }
}

/// The configuration hash of a site with `devices` (in id order), as seed 001 computes
/// it. See the module doc: the served body does not hash to it. Fails only for JSON
/// nested deeper than relais-wire serialises, which [`input`] refuses.
pub fn config_hash(site: &SiteFields, devices: &[DeviceFields]) -> Result<String, HashError> {
    let devices = devices.iter().map(|d| {
        object([
            ("ip", string(&d.ip)),
            ("name", string(&d.name)),
            ("building", string(&d.building)),
            ("floor", string(&d.floor)),
            ("room", string(&d.room)),
            ("type", string(&d.kind)),
            ("driver", string(&d.driver)),
            ("driver_config", Value::Object(d.driver_config.clone())),
            ("expectations", Value::Object(d.expectations.clone())),
        ])
    });
    let input = object([
        ("site_name", string(&site.name)),
        ("timezone", string(&site.timezone)),
        ("doubt_after_days", int(site.doubt_after_days)),
        ("ok_interval_s", int(site.ok_interval_s)),
        ("ko_interval_s", int(site.ko_interval_s)),
        ("devices", Value::Array(devices.collect())),
    ]);
    Ok(md5_hex(python_dumps(&input)?.as_bytes()))
}

/// The body of `GET /config/{site_token}` (contract section 3) and its hash.
pub fn served(site: &SiteFields, devices: &[DeviceFields]) -> Result<(String, String), HashError> {
    let hash = config_hash(site, devices)?;
    let devices = devices.iter().map(|d| {
        let driver = |member: &str| match d.driver_config.get(member) {
            Some(value) => value.clone(),
            None => Value::Object(Object::new()),
        };
        object([
            ("ip", string(&d.ip)),
            ("name", string(&d.name)),
            ("building", string(&d.building)),
            ("floor", string(&d.floor)),
            ("room", string(&d.room)),
            ("type", string(&d.kind)),
            ("driver", string(&d.driver)),
            ("snmp", driver("snmp")),
            ("pjlink", driver("pjlink")),
            ("expectations", Value::Object(d.expectations.clone())),
        ])
    });
    let body = object([
        (relais_wire::config_hash::HASH_MEMBER, string(&hash)),
        ("site_name", string(&site.name)),
        ("timezone", string(&site.timezone)),
        ("doubt_after_days", int(site.doubt_after_days)),
        (
            "reporting",
            object([
                ("ok_interval_s", int(site.ok_interval_s)),
                ("ko_interval_s", int(site.ko_interval_s)),
            ]),
        ),
        ("devices", Value::Array(devices.collect())),
    ]);
    Ok((hash, miniserde::json::to_string(&body)))
}

/// A site as the admin API answers it; `token` only in the answer that created it.
pub fn site_json(site: &Site, token: Option<&str>) -> String {
    let f = &site.fields;
    let mut obj = object_map([
        ("id", int(site.id)),
        ("name", string(&f.name)),
        ("timezone", string(&f.timezone)),
        ("doubt_after_days", int(f.doubt_after_days)),
        ("ok_interval_s", int(f.ok_interval_s)),
        ("ko_interval_s", int(f.ko_interval_s)),
        ("config_version", string(&site.config_version)),
        ("config_updated_at", string(&site.config_updated_at)),
    ]);
    if let Some(token) = token {
        obj.insert("token".into(), string(token));
    }
    miniserde::json::to_string(&Value::Object(obj))
}

/// A device as the admin API answers it: the members of `POST /admin/devices`, and `id`.
pub fn device_json(device: &Device) -> String {
    miniserde::json::to_string(&device_value(device))
}

/// A JSON array of `items` rendered by `render`.
pub fn list_json<T>(items: &[T], render: impl Fn(&T) -> String) -> String {
    let parts: Vec<String> = items.iter().map(render).collect();
    format!("[{}]", parts.join(", "))
}

fn device_value(device: &Device) -> Value {
    let d = &device.fields;
    object([
        ("id", int(device.id)),
        ("site_id", int(device.site_id)),
        ("ip", string(&d.ip)),
        ("name", string(&d.name)),
        ("building", string(&d.building)),
        ("floor", string(&d.floor)),
        ("room", string(&d.room)),
        ("type", string(&d.kind)),
        ("driver", string(&d.driver)),
        ("driver_config", Value::Object(d.driver_config.clone())),
        ("expectations", Value::Object(d.expectations.clone())),
    ])
}

/// A JSON object text as stored in a column (compact; any JSON object reads back).
pub fn object_text(obj: &Object) -> String {
    miniserde::json::to_string(obj)
}

/// Reads a stored JSON object column; `None` when it is not one.
pub fn object_of_text(text: &str) -> Option<Object> {
    match miniserde::json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => Some(obj),
        _ => None,
    }
}

fn string(s: &str) -> Value {
    Value::String(s.to_string())
}

fn int(n: i64) -> Value {
    Value::Number(match u64::try_from(n) {
        Ok(u) => Number::U64(u),
        Err(_) => Number::I64(n),
    })
}

fn object_map<const N: usize>(members: [(&str, Value); N]) -> Object {
    members
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn object<const N: usize>(members: [(&str, Value); N]) -> Value {
    Value::Object(object_map(members))
}
