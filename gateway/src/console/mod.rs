//! The operator's console at `/ui`: server-rendered HTML (maud), no script but the
//! browser's own forms. Pages: overview, devices (filtered, paged), a device (history,
//! state, properties, commands, alerts, a readings chart per measure), alerts (parents
//! with their children folded under them), dead letters (with replay).
//!
//! Auth is the API's: without `api.token` the console answers loopback hosts only (the
//! API's host guard); with a token, a login form sets it in an HttpOnly, SameSite=Strict
//! cookie, and every page asks for it (or the bearer header). Lists are paged, never
//! loaded whole.

mod chart;
mod pages;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;

use crate::api::ApiState;

/// The cookie the login form sets.
const COOKIE: &str = "iotgw_token";

/// The console's routes (merged into the API router, behind its host guard).
pub fn router(state: ApiState) -> Router<ApiState> {
    let pages = Router::new()
        .route("/ui", get(pages::overview))
        .route("/ui/devices", get(pages::devices))
        .route("/ui/devices/{id}", get(pages::device))
        .route("/ui/alerts", get(pages::alerts))
        .route("/ui/dead-letters", get(pages::dead_letters))
        .route("/ui/dead-letters/{id}/replay", post(pages::replay))
        .layer(axum::middleware::from_fn_with_state(state, require_login));
    Router::new()
        .route("/ui/login", get(login_form).post(login))
        .merge(pages)
}

/// The token a request carries in the console's cookie.
fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// Whether the request may see the console: no token is configured, or it carries it
/// (cookie or bearer header), compared in constant time.
fn logged_in(state: &ApiState, headers: &HeaderMap) -> bool {
    let live = state.core.live();
    let Some(token) = live.config.api.token.as_ref() else {
        return true;
    };
    crate::api::carries_token(headers, token.expose())
        || cookie_token(headers).is_some_and(|given| {
            bool::from(subtle::ConstantTimeEq::ct_eq(
                given.as_bytes(),
                token.expose().as_bytes(),
            ))
        })
}

/// Whether a form post comes from another site: its `Origin` names another host than the
/// request's own `Host` (a page elsewhere cannot make the console replay a dead letter,
/// even on a tokenless loopback console, where no cookie guards it).
fn cross_site(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    origin_host.is_none() || origin_host != host
}

async fn require_login(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    if req.method() != axum::http::Method::GET && cross_site(req.headers()) {
        return (
            StatusCode::FORBIDDEN,
            page(
                "Refused",
                html! { p class="error" role="alert" { "A form from another site cannot act on this console." } },
            ),
        )
            .into_response();
    }
    if logged_in(&state, req.headers()) {
        next.run(req).await
    } else {
        Redirect::to("/ui/login").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("a header value"));
        }
        h
    }

    #[test]
    fn a_post_from_another_site_is_cross_site_and_one_from_the_console_is_not() {
        assert!(!cross_site(&headers(&[("host", "127.0.0.1:8080")])));
        assert!(!cross_site(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080")
        ])));
        assert!(cross_site(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "https://evil.example")
        ])));
        assert!(cross_site(&headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "null")
        ])));
    }
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    token: String,
}

async fn login_form() -> Html<String> {
    page(
        "Log in",
        html! {
            form method="post" action="/ui/login" class="login" {
                label for="token" { "API token (" code { "api.token" } " of the gateway's config)" }
                input type="password" id="token" name="token" autocomplete="current-password" required;
                button type="submit" { "Log in" }
            }
        },
    )
}

async fn login(
    State(state): State<ApiState>,
    headers: HeaderMap,
    form: Form<LoginForm>,
) -> Response {
    if cross_site(&headers) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let live = state.core.live();
    let ok = live.config.api.token.as_ref().is_none_or(|t| {
        bool::from(subtle::ConstantTimeEq::ct_eq(
            form.token.as_bytes(),
            t.expose().as_bytes(),
        ))
    });
    if !ok {
        state.core.metrics.api_auth_failure();
        let body = page(
            "Log in",
            html! {
                p class="error" role="alert" { "That is not the gateway's API token." }
                form method="post" action="/ui/login" class="login" {
                    label for="token" { "API token" }
                    input type="password" id="token" name="token" required;
                    button type="submit" { "Log in" }
                }
            },
        );
        return (StatusCode::UNAUTHORIZED, body).into_response();
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/ui; HttpOnly; SameSite=Strict",
        form.token
    );
    let mut resp = Redirect::to("/ui").into_response();
    if let Ok(v) = header::HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// A page: the layout around `body`.
pub(crate) fn page(title: &str, body: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · iotgw" }
                    // No icon to fetch: a browser's /favicon.ico request would be a 404.
                    link rel="icon" href="data:,";
                    style { (maud::PreEscaped(CSS)) }
                }
                body {
                    header {
                        nav aria-label="Console" {
                            a href="/ui" { "Overview" }
                            a href="/ui/devices" { "Devices" }
                            a href="/ui/alerts" { "Alerts" }
                            a href="/ui/dead-letters" { "Dead letters" }
                        }
                    }
                    main {
                        h1 { (title) }
                        (body)
                    }
                }
            }
        }
        .into_string(),
    )
}

const CSS: &str = "
body{font-family:system-ui,sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
header{background:#12355b;padding:.6rem 1rem}
nav a{color:#fff;margin-right:1.2rem;text-decoration:none;font-weight:600}
nav a:focus,nav a:hover{text-decoration:underline}
main{padding:1rem 1.5rem;max-width:1200px}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;background:#fff}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#e8eef5}
.bad{color:#a4000f;font-weight:600}.good{color:#0a6b2b;font-weight:600}
.child td:first-child{padding-left:2rem}
.muted{color:#555}
form.filters label{margin-right:.8rem}
pre{white-space:pre-wrap;max-width:60rem;background:#fff;border:1px solid #ccc;padding:.4rem}
.error{color:#a4000f}
svg{background:#fff;border:1px solid #ccc}
";
