//! Who may use the dashboard, and how: users with a role (admin or viewer),
//! HTTP Basic sign-in, the CSRF check on every POST, and the security
//! headers every page carries.
//!
//! Closed by default: without configured users the dashboard answers only
//! loopback peers (and `errand serve` refuses a non-loopback bind).

use std::str::FromStr;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, HttpRequest, HttpResponse, web};
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;

/// What a dashboard user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything: retry, cancel, delete, replay, purge, pause.
    Admin,
    /// Read only: sees no action buttons, and the handlers refuse actions.
    Viewer,
}

/// A dashboard user, as configured: `name:password:role`.
#[derive(Clone, PartialEq, Eq)]
pub struct DashboardUser {
    pub name: String,
    pub password: String,
    pub role: Role,
}

impl std::fmt::Debug for DashboardUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DashboardUser")
            .field("name", &self.name)
            .field("password", &"***")
            .field("role", &self.role)
            .finish()
    }
}

impl FromStr for DashboardUser {
    type Err = String;

    /// `name:password:admin` or `name:password:viewer` (the password may
    /// hold colons; the role is the last part).
    fn from_str(spec: &str) -> Result<Self, String> {
        let usage = "a dashboard user is name:password:role, with role admin or viewer";
        let (rest, role) = spec
            .rsplit_once(':')
            .ok_or_else(|| format!("'{}': {usage}", spec.split(':').next().unwrap_or("")))?;
        let role = match role {
            "admin" => Role::Admin,
            "viewer" => Role::Viewer,
            other => return Err(format!("role '{other}': {usage}")),
        };
        let (name, password) = rest.split_once(':').ok_or_else(|| usage.to_string())?;
        if name.is_empty() || password.is_empty() {
            return Err(format!("user '{name}': {usage}, none of them empty"));
        }
        Ok(DashboardUser {
            name: name.to_string(),
            password: password.to_string(),
            role,
        })
    }
}

/// The signed-in user of a dashboard request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
    pub role: Role,
    /// The token this user's POSTs must carry (`X-CSRF-Token`).
    pub csrf: String,
}

impl Operator {
    pub fn can_act(&self) -> bool {
        self.role == Role::Admin
    }

    /// How the audit log names this user.
    pub fn actor(&self) -> String {
        format!("dashboard:{}", self.name)
    }
}

/// The configured users, ready for constant-time checks.
pub(crate) struct Access {
    users: Vec<KnownUser>,
    /// The CSRF token when no users are configured (loopback only).
    local_csrf: String,
}

struct KnownUser {
    name: String,
    name_digest: [u8; 32],
    password_digest: [u8; 32],
    role: Role,
    csrf: String,
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a request may not proceed.
pub(crate) enum Denied {
    /// No or wrong credentials: ask for them.
    SignIn(String),
    /// Known, but not allowed (cross-site, no token, viewer acting, remote
    /// without users).
    Forbidden(String),
}

impl Access {
    pub(crate) fn new(users: &[DashboardUser]) -> Access {
        let users = users
            .iter()
            .map(|u| KnownUser {
                name: u.name.clone(),
                name_digest: digest(u.name.as_bytes()),
                password_digest: digest(u.password.as_bytes()),
                role: u.role,
                // Derived from the password, so that every errand process
                // with the same configuration accepts the same token.
                csrf: hex(
                    &digest(format!("errand-csrf\n{}\n{}", u.name, u.password).as_bytes())[..16],
                ),
            })
            .collect();
        let random: [u8; 16] = rand::random();
        Access {
            users,
            local_csrf: hex(&random),
        }
    }

    /// Who is asking, from the Basic credentials (or the loopback rule).
    pub(crate) fn sign_in(&self, req: &HttpRequest) -> Result<Operator, Denied> {
        if self.users.is_empty() {
            let local = req.peer_addr().is_none_or(|a| a.ip().is_loopback());
            return if local {
                Ok(Operator {
                    name: "local".into(),
                    role: Role::Admin,
                    csrf: self.local_csrf.clone(),
                })
            } else {
                Err(Denied::Forbidden(
                    "this dashboard has no users configured, so it answers only on loopback; \
                     add one with --dashboard-user name:password:admin"
                        .into(),
                ))
            };
        }
        let credentials = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b64| {
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .ok()
            })
            .and_then(|raw| String::from_utf8(raw).ok());
        let Some(credentials) = credentials else {
            return Err(Denied::SignIn("sign in to see the dashboard".into()));
        };
        let (name, password) = credentials.split_once(':').unwrap_or((&credentials, ""));
        let (name, password) = (digest(name.as_bytes()), digest(password.as_bytes()));
        // Every user is checked, in constant time, whoever matches.
        let mut found = None;
        for user in &self.users {
            let matches = user.name_digest.ct_eq(&name) & user.password_digest.ct_eq(&password);
            if bool::from(matches) {
                found = Some(user);
            }
        }
        match found {
            Some(user) => Ok(Operator {
                name: user.name.clone(),
                role: user.role,
                csrf: user.csrf.clone(),
            }),
            None => Err(Denied::SignIn("wrong user name or password".into())),
        }
    }
}

/// A POST must come from our own pages: same-site by `Sec-Fetch-Site`
/// (or, from browsers that do not send it, by `Origin`), and carry the
/// user's token.
pub(crate) fn check_csrf(req: &HttpRequest, operator: &Operator) -> Result<(), Denied> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let cross_site = match header("sec-fetch-site") {
        Some(site) => site != "same-origin",
        None => match header("origin") {
            Some(origin) => {
                let info = req.connection_info();
                origin != format!("{}://{}", info.scheme(), info.host())
            }
            None => false,
        },
    };
    if cross_site {
        return Err(Denied::Forbidden(
            "cross-site request refused: act from errand's own pages".into(),
        ));
    }
    let token = header("x-csrf-token").unwrap_or_default();
    if !bool::from(token.as_bytes().ct_eq(operator.csrf.as_bytes())) {
        return Err(Denied::Forbidden(
            "missing or stale form token: reload the page and try again".into(),
        ));
    }
    Ok(())
}

/// Headers on every dashboard response: no inline script or style, no
/// framing, no sniffing.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
    frame-ancestors 'none'; base-uri 'none'; object-src 'none'";

fn secure(headers: &mut actix_web::http::header::HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
}

/// Signs the user in, checks POSTs, and secures the response.
pub(crate) async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .expect("AppState is registered")
        .clone();
    let checked = state.access.sign_in(req.request()).and_then(|operator| {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            check_csrf(req.request(), &operator)?;
        }
        Ok(operator)
    });
    let operator = match checked {
        Ok(operator) => operator,
        Err(denied) => {
            let mut response = denial(req.request(), denied);
            secure(response.headers_mut());
            return Ok(req.into_response(response).map_into_right_body());
        }
    };
    req.extensions_mut().insert(operator);
    let mut response = next.call(req).await?;
    secure(response.headers_mut());
    Ok(response.map_into_left_body())
}

/// The answer to a denied request: for htmx, a toast and no swap; for a
/// page load, a small page (and the Basic challenge when signing in).
fn denial(req: &HttpRequest, denied: Denied) -> HttpResponse {
    let (status, message, challenge) = match denied {
        Denied::SignIn(m) => (StatusCode::UNAUTHORIZED, m, true),
        Denied::Forbidden(m) => (StatusCode::FORBIDDEN, m, false),
    };
    let mut response = HttpResponse::build(status);
    if challenge {
        response.insert_header((
            header::WWW_AUTHENTICATE,
            "Basic realm=\"errand\", charset=\"UTF-8\"",
        ));
    }
    response.content_type("text/html; charset=utf-8");
    if super::pages::is_htmx(req) {
        response
            .insert_header(("HX-Reswap", "none"))
            .body(super::pages::toast_html("error", &message))
    } else {
        response.body(super::pages::error_page(status, &message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_parse_with_roles_and_colons_in_passwords() {
        let u: DashboardUser = "ada:pa:ss:admin".parse().unwrap();
        assert_eq!(
            (u.name.as_str(), u.password.as_str(), u.role),
            ("ada", "pa:ss", Role::Admin)
        );
        let v: DashboardUser = "bob:pw:viewer".parse().unwrap();
        assert_eq!(v.role, Role::Viewer);
        assert!(
            "bob:pw"
                .parse::<DashboardUser>()
                .unwrap_err()
                .contains("role")
        );
        assert!("bob:pw:root".parse::<DashboardUser>().is_err());
        assert!(":pw:admin".parse::<DashboardUser>().is_err());
        assert!(
            !format!("{u:?}").contains("pa:ss"),
            "passwords stay out of logs"
        );
    }
}
