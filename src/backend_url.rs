//! `BACKEND_URL` checked whole at start-up. Each endpoint is appended to it as text
//! (`{url}{endpoint}`), so anything beyond scheme, host, port and a path prefix would end
//! up inside the request's path: `http://host/?x=1` once became `POST /?x=1/api/evenements`,
//! which a catch-all backend acknowledged. A query string and a fragment are refused
//! rather than supported: nothing in the contract needs one, and a backend that did would
//! get the token-like parameters of a URL in every log line.

use std::net::Ipv6Addr;

/// What is wrong with `url` (its trailing '/' already removed), in words that never
/// repeat the URL: it may hold a password (`http://user:pass@host`) or a token in a
/// query string, and the line is printed before any secret is registered for redaction.
pub fn check(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    if url.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if let Some(i) = path.find(['?', '#']) {
        let what = if path[i..].starts_with('?') {
            "a query string ('?...')"
        } else {
            "a fragment ('#...')"
        };
        return Err(format!(
            "has {what}: each endpoint is appended to this URL, so it would land inside it; \
             give scheme, host, optional port and optional path prefix only"
        ));
    }
    // A user name and password (`user:pass@`) are the transport's business, kept as given.
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let (host, port) = split_host_port(host_port)?;
    if host.is_empty() {
        return Err("has no host".into());
    }
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => {}
            _ => return Err(format!("port {port:?} is not a number from 1 to 65535")),
        }
    }
    Ok(())
}

/// The host (an IPv6 address without its brackets) and the port text, if any.
fn split_host_port(host_port: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(bracketed) = host_port.strip_prefix('[') {
        let (addr, after) = bracketed
            .split_once(']')
            .ok_or("the IPv6 address is not closed with ']'")?;
        if addr.parse::<Ipv6Addr>().is_err() {
            return Err(format!("[{addr}] is not an IPv6 address"));
        }
        return match after {
            "" => Ok((addr, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((addr, Some(port))),
                None => Err(format!("{after:?} after the IPv6 address is not ':port'")),
            },
        };
    }
    let (host, port) = match host_port.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (host_port, None),
    };
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if !host.chars().all(allowed) {
        return Err(format!(
            "host {host:?} must be a name or an IPv4 address (IPv6 in brackets: http://[::1]:8000)"
        ));
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn accepts_what_the_transport_can_use() {
        for url in [
            "http://backend:8000",
            "https://backend.example.org",
            "http://192.168.1.2:1",
            "http://127.0.0.1:65535",
            "http://[::1]",
            "http://[::1]:8000",
            "http://[fe80::1:2]:8000/sync",
            "https://host/sync",
            "https://host/api/v2",
            "http://user:p%40ss@host:8000/prefix",
            "http://user@host",
        ] {
            assert_eq!(check(url), Ok(()), "{url}");
        }
    }

    #[test]
    fn refuses_what_would_be_misread() {
        for (url, why) in [
            ("http://[::1", "not closed"),
            ("http://[::1:8000/x", "not closed"),
            ("http://[nope]:80", "not an IPv6 address"),
            ("http://[::1]x", "is not ':port'"),
            ("http://host:65536", "port \"65536\""),
            ("http://host:99999", "port \"99999\""),
            ("http://host:0", "port \"0\""),
            ("http://host:", "port \"\""),
            ("http://host:+80", "port \"+80\""),
            ("http://host:80:90", "port \"80:90\""),
            ("http://::1:8000", "has no host"),
            ("http://host/?x=1", "query string"),
            ("http://host?x=1", "query string"),
            ("http://host/sync#top", "fragment"),
            ("http://", "has no host"),
            ("http:///path", "has no host"),
            ("http://user:pass@", "has no host"),
            ("http://ho st", "spaces"),
            ("http://h\u{7}st", "control"),
            ("http://h%41st", "must be a name"),
            ("ftp://host", "http:// or https://"),
            ("host:8000", "http:// or https://"),
        ] {
            let e = check(url).expect_err(url);
            assert!(e.contains(why), "{url}: {e}");
        }
    }

    #[test]
    fn never_repeats_a_password_or_a_query() {
        for url in [
            "http://user:s3cret-pw@host:99999",
            "http://user:s3cret-pw@[::1",
            "http://user:s3cret-pw@host/?s3cret-pw",
        ] {
            let e = check(url).expect_err(url);
            assert!(!e.contains("s3cret"), "{url}: {e}");
        }
    }
}
