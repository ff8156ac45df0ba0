//! The admin API's request bodies, read member by member into the records of
//! [`super`]. Nothing is stored from a body that fails here: the first invalid member
//! is an [`Invalid`] naming it (`field`) with a sentence (`detail`). Unknown members are
//! refused too, so a misspelt member is not silently ignored; `expectations` alone is
//! open (seed 001 lists its members, more may come), with its known members checked.

use std::fmt::Display;
use std::net::IpAddr;

use miniserde::json::{Number, Object, Value};

use super::{DRIVER_CONFIG_MEMBERS, DRIVERS, DevicePatch, NewDevice, SiteFields, SitePatch};

/// The schedule's day names (seed 001).
const DAYS: &[&str] = &["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
/// Deepest nesting accepted in `driver_config` and `expectations`: far more than a
/// device needs, far less than the hash's serialiser allows.
pub const MAX_NESTING: usize = 32;
/// A site token travels in the URL path: unreserved characters only, and long enough
/// not to be guessed.
const TOKEN_MIN_LEN: usize = 16;
const TOKEN_MAX_LEN: usize = 256;
/// Longest value quoted back in a detail.
const QUOTE_MAX_CHARS: usize = 64;

/// An invalid member: `field` is its path in the body (`ip`,
/// `expectations.schedule.rules[0].start`), `detail` the sentence for the operator
/// (`devices.ip: "999.1.1" is not an IP address`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub detail: String,
}

/// `POST /admin/sites`: the site and its token if the body gives one.
pub fn new_site(text: &str) -> Result<(SiteFields, Option<String>), Invalid> {
    let mut m = Members::parse(text, "sites")?;
    let token = m.take("token", |m, f, v| m.token(f, v))?;
    let patch = site_members(&mut m)?;
    let fields = SiteFields {
        name: m.required("name", patch.name)?,
        timezone: m.required("timezone", patch.timezone)?,
        doubt_after_days: patch.doubt_after_days.unwrap_or(2),
        ok_interval_s: patch.ok_interval_s.unwrap_or(300),
        ko_interval_s: patch.ko_interval_s.unwrap_or(60),
    };
    m.finish()?;
    Ok((fields, token))
}

/// `PUT /admin/sites/{id}`.
pub fn site_patch(text: &str) -> Result<SitePatch, Invalid> {
    let mut m = Members::parse(text, "sites")?;
    let patch = site_members(&mut m)?;
    m.finish()?;
    Ok(patch)
}

/// `POST /admin/devices` (seed 001's body).
pub fn new_device(text: &str) -> Result<NewDevice, Invalid> {
    let mut m = Members::parse(text, "devices")?;
    let site_id = m.take("site_id", |m, f, v| m.count(f, v, 1))?;
    let patch = device_members(&mut m)?;
    let fields = super::DeviceFields {
        ip: m.required("ip", patch.ip)?,
        name: m.required("name", patch.name)?,
        building: patch.building.unwrap_or_default(),
        floor: patch.floor.unwrap_or_default(),
        room: patch.room.unwrap_or_default(),
        kind: m.required("type", patch.kind)?,
        driver: m.required("driver", patch.driver)?,
        driver_config: patch.driver_config.unwrap_or_default(),
        expectations: patch.expectations.unwrap_or_default(),
    };
    let site_id = m.required("site_id", site_id)?;
    m.finish()?;
    Ok(NewDevice { site_id, fields })
}

/// `PUT /admin/devices/{id}`.
pub fn device_patch(text: &str) -> Result<DevicePatch, Invalid> {
    let mut m = Members::parse(text, "devices")?;
    if m.obj.contains_key("site_id") {
        return Err(m.invalid(
            "site_id",
            "a device stays on its site: delete it and create it on the other one",
        ));
    }
    let patch = device_members(&mut m)?;
    m.finish()?;
    Ok(patch)
}

fn site_members(m: &mut Members) -> Result<SitePatch, Invalid> {
    Ok(SitePatch {
        name: m.take("name", |m, f, v| m.nonempty(f, v))?,
        timezone: m.take("timezone", |m, f, v| m.nonempty(f, v))?,
        doubt_after_days: m.take("doubt_after_days", |m, f, v| m.count(f, v, 0))?,
        ok_interval_s: m.take("ok_interval_s", |m, f, v| m.count(f, v, 1))?,
        ko_interval_s: m.take("ko_interval_s", |m, f, v| m.count(f, v, 1))?,
    })
}

fn device_members(m: &mut Members) -> Result<DevicePatch, Invalid> {
    Ok(DevicePatch {
        ip: m.take("ip", |m, f, v| m.ip(f, v))?,
        name: m.take("name", |m, f, v| m.nonempty(f, v))?,
        building: m.take("building", |m, f, v| m.string(f, v))?,
        floor: m.take("floor", |m, f, v| m.string(f, v))?,
        room: m.take("room", |m, f, v| m.string(f, v))?,
        kind: m.take("type", |m, f, v| m.nonempty(f, v))?,
        driver: m.take("driver", |m, f, v| m.driver(f, v))?,
        driver_config: m.take("driver_config", |m, f, v| m.driver_config(f, v))?,
        expectations: m.take("expectations", |m, f, v| m.expectations(f, v))?,
    })
}

/// The members of one body, taken out one by one: what is left at the end is unknown.
struct Members {
    obj: Object,
    /// The table named in details, as in `devices.ip: ...`.
    table: &'static str,
}

type Check<T> = fn(&Members, &str, Value) -> Result<T, Invalid>;

impl Members {
    fn parse(text: &str, table: &'static str) -> Result<Members, Invalid> {
        let invalid = |detail: &str| Invalid {
            field: "body".into(),
            detail: format!("{table}: {detail}"),
        };
        match miniserde::json::from_str::<Value>(text) {
            Ok(Value::Object(obj)) => Ok(Members { obj, table }),
            Ok(_) => Err(invalid("the body must be a JSON object")),
            Err(_) => Err(invalid("the body is not valid JSON")),
        }
    }

    fn invalid(&self, field: &str, why: impl Display) -> Invalid {
        Invalid {
            field: field.to_string(),
            detail: format!("{}.{field}: {why}", self.table),
        }
    }

    /// The member `key` checked by `check`, `None` when absent.
    fn take<T>(&mut self, key: &str, check: Check<T>) -> Result<Option<T>, Invalid> {
        match self.obj.remove(key) {
            Some(value) => check(self, key, value).map(Some),
            None => Ok(None),
        }
    }

    fn required<T>(&self, key: &str, value: Option<T>) -> Result<T, Invalid> {
        value.ok_or_else(|| self.invalid(key, "is required"))
    }

    fn finish(self) -> Result<(), Invalid> {
        match self.obj.keys().next() {
            Some(key) => Err(self.invalid(key, "is not a member of this body")),
            None => Ok(()),
        }
    }

    fn string(&self, field: &str, value: Value) -> Result<String, Invalid> {
        match value {
            Value::String(s) => Ok(s),
            _ => Err(self.invalid(field, "must be a string")),
        }
    }

    fn nonempty(&self, field: &str, value: Value) -> Result<String, Invalid> {
        let s = self.string(field, value)?;
        if s.trim().is_empty() {
            return Err(self.invalid(field, "must not be empty"));
        }
        Ok(s)
    }

    /// A whole number of at least `min`.
    fn count(&self, field: &str, value: Value, min: i64) -> Result<i64, Invalid> {
        let n = match value {
            Value::Number(Number::U64(u)) => i64::try_from(u).ok(),
            Value::Number(Number::I64(i)) => Some(i),
            _ => return Err(self.invalid(field, "must be a whole number")),
        };
        match n {
            Some(n) if n >= min => Ok(n),
            _ => Err(self.invalid(field, format!("must be at least {min}"))),
        }
    }

    /// Stored in its canonical form, so that the UNIQUE (site_id, ip) constraint sees
    /// `::1` and `0::1` as one address.
    fn ip(&self, field: &str, value: Value) -> Result<String, Invalid> {
        let s = self.string(field, value)?;
        match s.parse::<IpAddr>() {
            Ok(ip) => Ok(ip.to_string()),
            Err(_) => Err(self.invalid(field, format!("{} is not an IP address", quote(&s)))),
        }
    }

    fn driver(&self, field: &str, value: Value) -> Result<String, Invalid> {
        let s = self.string(field, value)?;
        if !DRIVERS.contains(&s.as_str()) {
            return Err(self.invalid(
                field,
                format!(
                    "{} is not a driver (one of {})",
                    quote(&s),
                    DRIVERS.join(", ")
                ),
            ));
        }
        Ok(s)
    }

    /// Only the drivers' members, each an object: each is served as the device's
    /// member of that name, so nothing hashed goes unserved. Values are not quoted
    /// back: they hold device passwords.
    fn driver_config(&self, field: &str, value: Value) -> Result<Object, Invalid> {
        let obj = self.nested_object(field, value)?;
        for (key, member) in obj.iter() {
            let path = format!("{field}.{key}");
            if !DRIVER_CONFIG_MEMBERS.contains(&key.as_str()) {
                return Err(self.invalid(
                    &path,
                    format!("is not one of {}", DRIVER_CONFIG_MEMBERS.join(", ")),
                ));
            }
            if !matches!(member, Value::Object(_)) {
                return Err(self.invalid(&path, "must be an object"));
            }
        }
        Ok(obj)
    }

    fn expectations(&self, field: &str, value: Value) -> Result<Object, Invalid> {
        let obj = self.nested_object(field, value)?;
        if let Some(v) = obj.get("always_on") {
            if !matches!(v, Value::Bool(_)) {
                return Err(self.invalid(&format!("{field}.always_on"), "must be true or false"));
            }
        }
        if let Some(v) = obj.get("alert_after_s") {
            self.count(&format!("{field}.alert_after_s"), v.clone(), 0)?;
        }
        if let Some(v) = obj.get("schedule") {
            self.schedule(&format!("{field}.schedule"), v)?;
        }
        Ok(obj)
    }

    fn schedule(&self, field: &str, value: &Value) -> Result<(), Invalid> {
        let Value::Object(schedule) = value else {
            return Err(self.invalid(field, "must be an object"));
        };
        if let Some(tz) = schedule.get("timezone") {
            self.nonempty(&format!("{field}.timezone"), tz.clone())?;
        }
        let rules_field = format!("{field}.rules");
        let Some(Value::Array(rules)) = schedule.get("rules") else {
            return Err(self.invalid(&rules_field, "must be an array of rules"));
        };
        for (i, rule) in rules.iter().enumerate() {
            self.rule(&format!("{rules_field}[{i}]"), rule)?;
        }
        Ok(())
    }

    /// `{"days": ["mon", ...], "start": "HH:MM", "end": "HH:MM"}`, start before end.
    fn rule(&self, field: &str, rule: &Value) -> Result<(), Invalid> {
        let Value::Object(rule) = rule else {
            return Err(self.invalid(field, "must be an object"));
        };
        let days_field = format!("{field}.days");
        let days = match rule.get("days") {
            Some(Value::Array(days)) if !days.is_empty() => days,
            _ => return Err(self.invalid(&days_field, "must be a non-empty array of days")),
        };
        for (i, day) in days.iter().enumerate() {
            if !matches!(day, Value::String(d) if DAYS.contains(&d.as_str())) {
                return Err(self.invalid(
                    &format!("{days_field}[{i}]"),
                    format!("must be one of {}", DAYS.join(", ")),
                ));
            }
        }
        let start = self.time_of_day(&format!("{field}.start"), rule.get("start"))?;
        let end = self.time_of_day(&format!("{field}.end"), rule.get("end"))?;
        if start >= end {
            return Err(self.invalid(&format!("{field}.end"), "must be later than start"));
        }
        Ok(())
    }

    /// `HH:MM`, 00:00 to 23:59, as minutes since midnight.
    fn time_of_day(&self, field: &str, value: Option<&Value>) -> Result<u32, Invalid> {
        let Some(Value::String(s)) = value else {
            return Err(self.invalid(field, "must be a time HH:MM"));
        };
        parse_hh_mm(s)
            .ok_or_else(|| self.invalid(field, format!("{} is not a time HH:MM", quote(s))))
    }

    fn nested_object(&self, field: &str, value: Value) -> Result<Object, Invalid> {
        let Value::Object(obj) = value else {
            return Err(self.invalid(field, "must be an object"));
        };
        if obj.values().any(|v| deeper_than(v, MAX_NESTING - 1)) {
            return Err(self.invalid(field, format!("is nested deeper than {MAX_NESTING} levels")));
        }
        Ok(obj)
    }

    fn token(&self, field: &str, value: Value) -> Result<String, Invalid> {
        // The value is a secret: never quoted back.
        let token = self.string(field, value)?;
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        if !(TOKEN_MIN_LEN..=TOKEN_MAX_LEN).contains(&token.len()) || !token.bytes().all(allowed) {
            return Err(self.invalid(
                field,
                format!(
                    "must be {TOKEN_MIN_LEN} to {TOKEN_MAX_LEN} characters among A-Z a-z 0-9 - . _ ~ \
                     (it travels in the URL path)"
                ),
            ));
        }
        Ok(token)
    }
}

/// Whether `value` has more than `levels` levels of non-empty arrays and objects
/// (recursion stops there, so a hostile body cannot exhaust the stack).
fn deeper_than(value: &Value, levels: usize) -> bool {
    let children: Box<dyn Iterator<Item = &Value>> = match value {
        Value::Array(items) => Box::new(items.iter()),
        Value::Object(obj) => Box::new(obj.values()),
        _ => return false,
    };
    let mut children = children.peekable();
    if children.peek().is_none() {
        return false;
    }
    levels == 0 || children.any(|child| deeper_than(child, levels - 1))
}

fn parse_hh_mm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !(h.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// `s` as a JSON string, cut to a readable length.
fn quote(s: &str) -> String {
    let mut out = String::new();
    let cut: String = s.chars().take(QUOTE_MAX_CHARS).collect();
    relais_wire::json::push_escaped(&mut out, &cut, false);
    if cut.len() < s.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_of_day() {
        assert_eq!(parse_hh_mm("08:00"), Some(480));
        assert_eq!(parse_hh_mm("23:59"), Some(1439));
        for bad in [
            "24:00", "8:00", "08:60", "08-00", "0800", "+8:00", "08:0a", "",
        ] {
            assert_eq!(parse_hh_mm(bad), None, "{bad}");
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let parse = |t: &str| miniserde::json::from_str::<Value>(t).expect("json");
        assert!(!deeper_than(&parse("1"), 0));
        assert!(!deeper_than(&parse("[]"), 0));
        assert!(deeper_than(&parse("[1]"), 0));
        assert!(deeper_than(&parse("[[1]]"), 1));
        assert!(!deeper_than(&parse("[[1], {}]"), 2));
        assert!(deeper_than(&parse(r#"[{"a": [1]}]"#), 2));
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(deeper_than(&parse(&deep), MAX_NESTING));
    }

    #[test]
    fn the_first_invalid_member_is_named() {
        let err = new_device(
            r#"{"site_id": 1, "ip": "999.1.1", "name": "a", "type": "t", "driver": "ping"}"#,
        )
        .unwrap_err();
        assert_eq!(err.field, "ip");
        assert_eq!(err.detail, r#"devices.ip: "999.1.1" is not an IP address"#);
        let err = new_site(r#"{"name": "s", "timezone": "UTC", "nmae": 1}"#).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.detail.as_str()),
            ("nmae", "sites.nmae: is not a member of this body")
        );
    }
}
