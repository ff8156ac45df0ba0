//! Access to the console: the login form (an admin token; a device token, a revoked or
//! unknown one is refused), the session it opens, kept in the store (README, "Fleet
//! console": idle 12 h, at most 7 days), its cookie, CSRF protection of every form, and
//! logout.
//!
//! The cookie `relais_session` holds a random id; the store keeps its SHA-256 only, so
//! a copy of the store opens no session. Cookies are HttpOnly, SameSite=Strict, Path=/,
//! and Secure when the request came over TLS: the operator's reverse proxy says so with
//! `X-Forwarded-Proto: https` (relais-server speaks plain HTTP itself), or
//! `--console-secure-cookie` makes them Secure whatever the request says, for a proxy
//! that does not send the header. A forged header only makes its sender's own cookie
//! Secure, so trusting it costs nothing.
//!
//! CSRF: every POST form carries the session's token in a hidden `csrf` field, compared
//! in constant time; the login form, before any session, compares its field with a
//! cookie it set (double submit). A POST whose `Origin` names another host is refused
//! too. Both are checked by [`Posted`] before any handler runs, so no form can forget.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use subtle::ConstantTimeEq as _;

use super::Console;
use super::error::Error;
use super::form::Form;
use super::layout;
use crate::http::auth;
use crate::http::uploads::now_s;
use crate::store::{NewSession, SessionLife, Store, TokenKind};
use crate::tokens;

pub const SESSION_COOKIE: &str = "relais_session";
/// The login form's double-submit cookie, sent back to `/login` only.
const LOGIN_COOKIE: &str = "relais_login_csrf";
/// A working day of inactivity, and a week at most: an admin logs in again weekly.
pub const LIFE: SessionLife = SessionLife {
    idle_s: 12 * 3600,
    absolute_s: 7 * 86_400,
};

/// A request with a live session, its admin token still valid. Extracting it answers
/// 303 to `/login` otherwise (and forgets a session whose token was revoked).
#[derive(Debug, Clone)]
pub struct LoggedIn {
    pub csrf: String,
}

impl<S: Store> FromRequestParts<Console<S>> for LoggedIn {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Console<S>,
    ) -> Result<LoggedIn, Error> {
        let id = cookie(&parts.headers, SESSION_COOKIE).ok_or(Error::LoggedOut)?;
        let id_sha256 = tokens::sha256_hex(id);
        let store = &console.app.store;
        let session = store
            .session(id_sha256.clone(), now_s(), LIFE)
            .await?
            .ok_or(Error::LoggedOut)?;
        let token = auth::find_token(store, &console.tokens, session.token_sha256).await?;
        if !matches!(token, Some(t) if t.kind == TokenKind::Admin) {
            // The session dies with its token.
            store.delete_session(id_sha256).await?;
            tracing::info!("console: a session's admin token was revoked: session closed");
            return Err(Error::LoggedOut);
        }
        Ok(LoggedIn { csrf: session.csrf })
    }
}

/// A POST form from a live session, its CSRF token and origin checked.
#[derive(Debug)]
pub struct Posted {
    pub session: LoggedIn,
    pub form: Form,
}

impl<S: Store> FromRequest<Console<S>> for Posted {
    type Rejection = Error;

    async fn from_request(req: Request, console: &Console<S>) -> Result<Posted, Error> {
        let (mut parts, body) = req.into_parts();
        same_origin(&parts.headers)?;
        let session = LoggedIn::from_request_parts(&mut parts, console).await?;
        let form = read_form(Request::from_parts(parts, body), console).await?;
        check_csrf(form.get("csrf"), Some(&session.csrf))?;
        Ok(Posted { session, form })
    }
}

async fn read_form<S: Store>(req: Request, console: &Console<S>) -> Result<Form, Error> {
    let bytes = Bytes::from_request(req, console)
        .await
        .map_err(|e| Error::BadRequest(format!("console: the form cannot be read: {e}")))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Error::BadRequest("console: the form is not UTF-8".into()))?;
    Ok(Form::parse(text))
}

fn check_csrf(sent: Option<&str>, expected: Option<&str>) -> Result<(), Error> {
    match (sent, expected) {
        (Some(sent), Some(expected))
            if !expected.is_empty() && bool::from(sent.as_bytes().ct_eq(expected.as_bytes())) =>
        {
            Ok(())
        }
        (None, _) => Err(Error::CsrfRefused(
            "console: this form came without its CSRF token: reload the page and send it again"
                .into(),
        )),
        _ => Err(Error::CsrfRefused(
            "console: this form's CSRF token is not this session's: reload the page and send \
             it again"
                .into(),
        )),
    }
}

/// A browser names the page a POST comes from in `Origin`: it must be this host (as the
/// browser reached it: `Host`, or the proxy's `X-Forwarded-Host`). Without the header
/// (an older browser, a script) the CSRF token decides alone.
fn same_origin(headers: &HeaderMap) -> Result<(), Error> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin_host = origin.to_str().ok().and_then(|o| {
        o.strip_prefix("https://")
            .or_else(|| o.strip_prefix("http://"))
    });
    let ours = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .zip(origin_host)
            .is_some_and(|(host, origin)| host.eq_ignore_ascii_case(origin))
    };
    if ours(header::HOST) || ours(header::HeaderName::from_static("x-forwarded-host")) {
        Ok(())
    } else {
        Err(Error::CsrfRefused(
            "console: this form was sent from another site's page (Origin)".into(),
        ))
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(k, v)| (k == name && !v.is_empty()).then_some(v))
}

fn secure<S>(headers: &HeaderMap, console: &Console<S>) -> bool {
    console.secure_cookie
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// A `Set-Cookie` value; `None` clears the cookie.
fn set_cookie(name: &str, value: Option<&str>, path: &str, secure: bool) -> HeaderValue {
    let mut c = format!(
        "{name}={}; Path={path}; HttpOnly; SameSite=Strict",
        value.unwrap_or("")
    );
    if value.is_none() {
        c.push_str("; Max-Age=0");
    }
    if secure {
        c.push_str("; Secure");
    }
    // Names, hex values and fixed attributes only: always a valid header value.
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `GET /login`: the form, with a fresh double-submit token.
pub async fn login_page<S: Store>(
    State(console): State<Console<S>>,
    headers: HeaderMap,
) -> Response {
    login_form(&console, &headers, StatusCode::OK, None)
}

fn login_form<S>(
    console: &Console<S>,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    let csrf = match tokens::generate() {
        Ok(csrf) => csrf,
        Err(e) => return Error::Internal(e).into_response(),
    };
    let page = login_markup(&csrf, error);
    let mut resp = (status, page).into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(
            LOGIN_COOKIE,
            Some(&csrf),
            "/login",
            secure(headers, console),
        ),
    );
    resp
}

fn login_markup(csrf: &str, error: Option<&str>) -> Markup {
    layout::bare(
        "Log in",
        html! {
            h1 { "relais fleet console" }
            form id="login" method="post" action="/login" {
                input type="hidden" name="csrf" value=(csrf);
                label for="token" { "Admin token" }
                input type="password" name="token" id="token" autocomplete="off" required;
                @if let Some(error) = error {
                    p id="login-error" class="error" { (error) }
                }
                p { button type="submit" id="login-submit" { "Log in" } }
            }
            p class="muted" {
                "An admin token from " code { "relais-server token add --admin NAME" } "."
            }
        },
    )
}

/// `POST /login`: an admin token opens a session; anything else shows the form again
/// with the reason.
pub async fn login<S: Store>(
    State(console): State<Console<S>>,
    req: Request,
) -> Result<Response, Error> {
    let headers = req.headers().clone();
    same_origin(&headers)?;
    let form = read_form(req, &console).await?;
    check_csrf(form.get("csrf"), cookie(&headers, LOGIN_COOKIE))?;
    let token = form.value("token").trim();
    let refused = |status, why: &str| Ok(login_form(&console, &headers, status, Some(why)));
    if token.is_empty() {
        return refused(StatusCode::UNAUTHORIZED, "login: enter an admin token");
    }
    let token_sha256 = tokens::sha256_hex(token);
    let store = &console.app.store;
    match auth::find_token(store, &console.tokens, token_sha256.clone()).await? {
        None => {
            tracing::info!("console: login refused: unknown or revoked token");
            refused(StatusCode::UNAUTHORIZED, "login: unknown or revoked token")
        }
        Some(info) if info.kind != TokenKind::Admin => {
            tracing::info!("console: login refused: a device token");
            refused(
                StatusCode::FORBIDDEN,
                "login: this is a device token; the console takes an admin token",
            )
        }
        Some(info) => {
            let id = tokens::generate().map_err(Error::Internal)?;
            let csrf = tokens::generate().map_err(Error::Internal)?;
            let new = NewSession {
                id_sha256: tokens::sha256_hex(&id),
                token_sha256,
                csrf,
                now: now_s(),
            };
            store.create_session(new, LIFE).await?;
            tracing::info!(token = info.id, "console: logged in");
            let secure = secure(&headers, &console);
            let mut resp = Redirect::to("/").into_response();
            let h = resp.headers_mut();
            h.append(
                header::SET_COOKIE,
                set_cookie(SESSION_COOKIE, Some(&id), "/", secure),
            );
            h.append(
                header::SET_COOKIE,
                set_cookie(LOGIN_COOKIE, None, "/login", secure),
            );
            Ok(resp)
        }
    }
}

/// `POST /logout`: the session is removed from the store, its cookie cleared.
pub async fn logout<S: Store>(
    State(console): State<Console<S>>,
    headers: HeaderMap,
    _posted: Posted,
) -> Result<Response, Error> {
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        console
            .app
            .store
            .delete_session(tokens::sha256_hex(id))
            .await?;
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, None, "/", secure(&headers, &console)),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().expect("header value"));
        }
        h
    }

    #[test]
    fn cookies_are_found_by_name() {
        let h = headers(&[("cookie", "a=1; relais_session=abc"), ("cookie", "b=2")]);
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "relais"), None);
    }

    #[test]
    fn csrf_tokens_must_match() {
        assert!(check_csrf(Some("abc"), Some("abc")).is_ok());
        assert!(check_csrf(Some("abd"), Some("abc")).is_err());
        assert!(check_csrf(None, Some("abc")).is_err());
        assert!(
            check_csrf(Some(""), Some("")).is_err(),
            "empty never matches"
        );
        assert!(check_csrf(Some("abc"), None).is_err());
    }

    #[test]
    fn origin_must_be_this_host() {
        assert!(same_origin(&headers(&[("host", "a:8080")])).is_ok());
        let ok = [("host", "a:8080"), ("origin", "http://a:8080")];
        assert!(same_origin(&headers(&ok)).is_ok());
        let proxied = [
            ("host", "127.0.0.1:8080"),
            ("x-forwarded-host", "fleet.example"),
            ("origin", "https://fleet.example"),
        ];
        assert!(same_origin(&headers(&proxied)).is_ok());
        let evil = [("host", "a:8080"), ("origin", "https://evil.example")];
        assert!(same_origin(&headers(&evil)).is_err());
        assert!(same_origin(&headers(&[("host", "a"), ("origin", "null")])).is_err());
    }

    #[test]
    fn cookie_flags() {
        let set = set_cookie(SESSION_COOKIE, Some("ab"), "/", true);
        assert_eq!(
            set.to_str().expect("text"),
            "relais_session=ab; Path=/; HttpOnly; SameSite=Strict; Secure"
        );
        let clear = set_cookie(SESSION_COOKIE, None, "/", false);
        assert_eq!(
            clear.to_str().expect("text"),
            "relais_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
        );
    }
}
