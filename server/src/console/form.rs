//! HTML forms: the `application/x-www-form-urlencoded` body (and query) read into
//! pairs, and a form's fields turned into the JSON body the admin API takes, so that
//! [`crate::site_config::input`] validates a form exactly as it validates the API.

use miniserde::json::{Number, Object, Value};
use percent_encoding::percent_decode_str;

use crate::site_config::input::Invalid;

/// The fields of a submitted form (or a query string), in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form(Vec<(String, String)>);

impl Form {
    pub fn parse(text: &str) -> Form {
        Form(
            text.split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    /// The first value of `name`, if the form has it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find_map(|(k, v)| (k == name).then_some(v.as_str()))
    }

    /// The value of `name`, `""` when absent: what a re-filled form shows.
    pub fn value(&self, name: &str) -> &str {
        self.get(name).unwrap_or("")
    }
}

impl FromIterator<(String, String)> for Form {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Form {
        Form(pairs.into_iter().collect())
    }
}

/// `+` is a space in a form, then `%XX` escapes; bytes that are not UTF-8 become U+FFFD.
fn decode(s: &str) -> String {
    percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// How a field becomes a JSON member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    /// A whole number; what does not parse is passed on as a string, so the validator
    /// refuses it with its own sentence. Empty: the member is left out (the API's
    /// default on creation).
    Number,
    /// A JSON object typed in a text area; empty is `{}`.
    Json,
}

/// The JSON object the admin API would be sent for `form`'s `fields`. Only a text area
/// that is not JSON at all is refused here (the validator takes parsed JSON): named
/// like the validator names a member, `table.field`.
pub fn body(form: &Form, fields: &[(&str, Kind)], table: &str) -> Result<Object, Invalid> {
    let mut obj = Object::new();
    for &(name, kind) in fields {
        let raw = form.value(name);
        let value = match kind {
            Kind::Text => Value::String(raw.to_string()),
            Kind::Number if raw.trim().is_empty() => continue,
            Kind::Number => match raw.trim().parse::<i64>() {
                Ok(n) if n >= 0 => Value::Number(Number::U64(n as u64)),
                Ok(n) => Value::Number(Number::I64(n)),
                Err(_) => Value::String(raw.to_string()),
            },
            Kind::Json if raw.trim().is_empty() => Value::Object(Object::new()),
            Kind::Json => miniserde::json::from_str::<Value>(raw).map_err(|_| Invalid {
                field: name.to_string(),
                detail: format!("{table}.{name}: is not JSON"),
            })?,
        };
        obj.insert(name.to_string(), value);
    }
    Ok(obj)
}

/// The form field an [`Invalid`] belongs beside: the first part of its path
/// (`expectations.schedule.rules[0].start` is the `expectations` text area's).
pub fn field_of(invalid: &Invalid) -> &str {
    let end = invalid
        .field
        .find(['.', '['])
        .unwrap_or(invalid.field.len());
    &invalid.field[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_decoded() {
        let form = Form::parse("name=Site+Paris&tz=Europe%2FParis&x=%3Cscript%3E&empty=&flag");
        assert_eq!(form.get("name"), Some("Site Paris"));
        assert_eq!(form.get("tz"), Some("Europe/Paris"));
        assert_eq!(form.get("x"), Some("<script>"));
        assert_eq!(form.get("empty"), Some(""));
        assert_eq!(form.get("flag"), Some(""));
        assert_eq!(form.get("missing"), None);
        assert_eq!(form.value("missing"), "");
    }

    #[test]
    fn fields_become_the_api_body() {
        let form = Form::parse("name=a&n=12&bad=twelve&blank=&cfg=%7B%22a%22%3A1%7D&none=");
        let fields = [
            ("name", Kind::Text),
            ("n", Kind::Number),
            ("bad", Kind::Number),
            ("blank", Kind::Number),
            ("cfg", Kind::Json),
            ("none", Kind::Json),
        ];
        let obj = body(&form, &fields, "sites").expect("body");
        assert_eq!(
            miniserde::json::to_string(&obj),
            r#"{"bad":"twelve","cfg":{"a":1},"n":12,"name":"a","none":{}}"#
        );
        let form = Form::parse("cfg=%7Bnope");
        let err = body(&form, &[("cfg", Kind::Json)], "devices").unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.detail.as_str()),
            ("cfg", "devices.cfg: is not JSON")
        );
    }

    #[test]
    fn nested_errors_belong_to_their_text_area() {
        let at = |field: &str| {
            field_of(&Invalid {
                field: field.into(),
                detail: String::new(),
            })
            .to_string()
        };
        assert_eq!(at("ip"), "ip");
        assert_eq!(at("expectations.schedule.rules[0].start"), "expectations");
        assert_eq!(at("driver_config[0]"), "driver_config");
    }
}
