//! relais-server's admin API over HTTP, as the demo and the tests drive the in-process
//! server ([`crate::received::EmbeddedServer`] runs `--no-auth`: the admin API is open):
//! sites created with the token the agent pulls with, their devices, and the hash
//! `GET /config/{site_token}` then serves. Through ureq, the agent's one HTTP client.

use std::time::Duration;

use miniserde::json::{Number, Value};

/// Long enough for a loaded test machine, short enough that a hung server fails a test.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The admin API of one server.
pub struct SiteAdmin {
    url: String,
    agent: ureq::Agent,
}

impl SiteAdmin {
    /// The server at `url` (`http://127.0.0.1:PORT`).
    pub fn new(url: &str) -> SiteAdmin {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .build()
            .into();
        SiteAdmin {
            url: url.trim_end_matches('/').to_string(),
            agent,
        }
    }

    /// `POST /admin/sites` with `body` (a JSON object, its `token` among its members);
    /// returns the new site's id.
    pub fn create_site(&self, body: &str) -> Result<i64, String> {
        let site = self.send("POST", "/admin/sites", Some(body), 201)?;
        id_of(&site, "POST /admin/sites")
    }

    /// `PUT /admin/sites/{id}`: the members of `body` change, the others stay.
    pub fn update_site(&self, id: i64, body: &str) -> Result<(), String> {
        self.send("PUT", &format!("/admin/sites/{id}"), Some(body), 200)
            .map(drop)
    }

    /// `POST /admin/devices` with `body` (its `site_id` among its members); returns the
    /// new device's id.
    pub fn add_device(&self, body: &str) -> Result<i64, String> {
        let device = self.send("POST", "/admin/devices", Some(body), 201)?;
        id_of(&device, "POST /admin/devices")
    }

    /// Deletes every device of site `site_id`; returns how many there were.
    pub fn remove_devices(&self, site_id: i64) -> Result<usize, String> {
        let path = format!("/admin/devices?site_id={site_id}");
        let Value::Array(devices) = self.send("GET", &path, None, 200)? else {
            return Err(format!(
                "site admin: GET {path}: the answer is not an array"
            ));
        };
        for device in &devices {
            let id = id_of(device, &format!("GET {path}"))?;
            self.send("DELETE", &format!("/admin/devices/{id}"), None, 204)?;
        }
        Ok(devices.len())
    }

    /// The `config_hash` that `GET /config/{token}` serves now.
    pub fn served_hash(&self, token: &str) -> Result<String, String> {
        // The token is a secret: errors name the route, never the path.
        let route = "GET /config/{site_token}";
        let path = format!("/config/{token}");
        match self.request("GET", &path, "/config/{site_token}", None, 200)? {
            Value::Object(obj) => match obj.get(crate::config_hash::HASH_MEMBER) {
                Some(Value::String(hash)) => Ok(hash.clone()),
                _ => Err(format!("site admin: {route}: no config_hash in the answer")),
            },
            _ => Err(format!("site admin: {route}: the answer is not an object")),
        }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        expect: u16,
    ) -> Result<Value, String> {
        self.request(method, path, path, body, expect)
    }

    /// One request; the answer's JSON (`null` for an empty body) when its status is
    /// `expect`, else `site admin: METHOD SHOWN: STATUS BODY` (`shown` is the path as
    /// errors name it).
    fn request(
        &self,
        method: &str,
        path: &str,
        shown: &str,
        body: Option<&str>,
        expect: u16,
    ) -> Result<Value, String> {
        let url = format!("{}{path}", self.url);
        let what = format!("site admin: {method} {shown}");
        let answer = match (method, body) {
            ("POST", Some(b)) => self.json(self.agent.post(&url)).send(b),
            ("PUT", Some(b)) => self.json(self.agent.put(&url)).send(b),
            ("GET", None) => self.agent.get(&url).call(),
            ("DELETE", None) => self.agent.delete(&url).call(),
            _ => return Err(format!("{what}: not a request this client makes")),
        };
        let mut answer = answer.map_err(|e| format!("{what}: {e}"))?;
        let status = answer.status().as_u16();
        let text = answer
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("{what}: reading the answer: {e}"))?;
        if status != expect {
            return Err(format!("{what}: {status} {}", text.trim()));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        miniserde::json::from_str(&text).map_err(|_| format!("{what}: the answer is not JSON"))
    }

    fn json<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        req.header("Content-Type", "application/json")
    }
}

fn id_of(record: &Value, what: &str) -> Result<i64, String> {
    match record {
        Value::Object(obj) => match obj.get("id") {
            Some(Value::Number(Number::U64(id))) => i64::try_from(*id).ok(),
            _ => None,
        },
        _ => None,
    }
    .ok_or_else(|| format!("site admin: {what}: no id in the answer"))
}
