//! Who may use the dashboard. With tokens configured, a browser signs in once with an admin or
//! viewer token and gets a session cookie (HttpOnly, SameSite=Strict; Secure when the page was
//! served under TLS or reached through a TLS-terminating proxy that says `X-Forwarded-Proto:
//! https`); the token is
//! never put in a URL or a log. Without tokens the dashboard serves loopback only, every
//! visitor an admin. Every form that changes a sweep carries a CSRF token: the session's, or
//! without tokens this process's, which a page of another origin cannot read.

use crate::auth::{Role, Tokens};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The session cookie's name.
pub const COOKIE: &str = "seedsweep_session";
/// How long a session lasts.
pub const SESSION_LIFE: Duration = Duration::from_secs(12 * 3600);
/// The most sessions held at once: a sign-in past it ends the oldest.
const MAX_SESSIONS: usize = 10_000;

/// What a request may do, once its visitor is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visitor {
    pub role: Role,
    /// The token its forms must send back.
    pub csrf: String,
    /// Through a session (tokens configured), which it may end.
    pub signed_in: bool,
}

impl Visitor {
    pub fn may_change_sweeps(&self) -> bool {
        self.role == Role::Admin
    }
}

struct Session {
    visitor: Visitor,
    expires: Instant,
}

pub struct Access {
    /// None: no tokens, loopback only, everyone an admin.
    tokens: Option<Tokens>,
    /// Without tokens: the CSRF token of every page this process serves.
    open_csrf: String,
    sessions: Mutex<HashMap<String, Session>>,
}

/// 32 random bytes, hex: a session id or a CSRF token.
fn secret() -> String {
    rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares without leaking, through timing, how much of a guess is right.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Access {
    pub fn new(tokens: Option<Tokens>) -> Access {
        Access {
            tokens,
            open_csrf: secret(),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    pub fn needs_sign_in(&self) -> bool {
        self.tokens.is_some()
    }

    /// The visitor a request's `Cookie` header names; None: not signed in.
    pub fn visitor(&self, cookie_header: Option<&str>) -> Option<Visitor> {
        if self.tokens.is_none() {
            return Some(Visitor {
                role: Role::Admin,
                csrf: self.open_csrf.clone(),
                signed_in: false,
            });
        }
        let id = session_id(cookie_header?)?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.visitor.clone()),
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        }
    }

    /// Signs in with a token: a new session's id, or why not.
    pub fn sign_in(&self, token: &str) -> Result<String, String> {
        let Some(tokens) = &self.tokens else {
            return Err("this dashboard has no tokens: nobody needs to sign in".into());
        };
        let caller = tokens
            .identify(Some(&format!("Bearer {}", token.trim())))
            .map_err(|_| "that token is not valid".to_string())?;
        if caller.role == Role::Worker {
            return Err(
                "a worker token cannot open the dashboard: use an admin or viewer token".into(),
            );
        }
        let role = caller.role;
        tracing::info!(token = %caller.token, "dashboard sign-in");
        let id = secret();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                sessions.remove(&k);
            }
        }
        let visitor = Visitor {
            role,
            csrf: secret(),
            signed_in: true,
        };
        let expires = now + SESSION_LIFE;
        sessions.insert(id.clone(), Session { visitor, expires });
        Ok(id)
    }

    pub fn sign_out(&self, cookie_header: Option<&str>) {
        if let Some(id) = cookie_header.and_then(session_id) {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.remove(id);
        }
    }

    /// Whether a form's CSRF token is the visitor's.
    pub fn csrf_ok(visitor: &Visitor, sent: &str) -> bool {
        same(&visitor.csrf, sent)
    }
}

/// The session id in a `Cookie` header.
fn session_id(header: &str) -> Option<&str> {
    header.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name == COOKIE).then_some(value)
    })
}

/// The `Set-Cookie` value for a new session (`secure`: reached over HTTPS).
pub fn session_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_LIFE.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends a session in the browser.
pub fn expired_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(&["w".repeat(32)], &["a".repeat(32)])
            .unwrap()
            .with_viewers(&["v".repeat(32)])
            .unwrap()
    }

    #[test]
    fn admins_and_viewers_sign_in_workers_and_strangers_do_not() {
        let access = Access::new(Some(tokens()));
        assert!(access.visitor(None).is_none());
        assert!(access.sign_in(&"w".repeat(32)).is_err());
        assert!(access.sign_in("guess").is_err());
        let viewer = access.sign_in(&"v".repeat(32)).unwrap();
        let cookie = format!("other=1; {COOKIE}={viewer}");
        let v = access.visitor(Some(&cookie)).unwrap();
        assert_eq!(v.role, Role::Viewer);
        assert!(!v.may_change_sweeps());
        let admin = access.sign_in(&"a".repeat(32)).unwrap();
        let a = access.visitor(Some(&format!("{COOKIE}={admin}"))).unwrap();
        assert!(a.may_change_sweeps());
        assert!(Access::csrf_ok(&a, &a.csrf));
        assert!(
            !Access::csrf_ok(&a, &v.csrf),
            "another session's CSRF token"
        );
        assert!(!Access::csrf_ok(&a, ""));
        access.sign_out(Some(&format!("{COOKIE}={admin}")));
        assert!(access.visitor(Some(&format!("{COOKIE}={admin}"))).is_none());
        assert!(access.visitor(Some(&format!("{COOKIE}=forged"))).is_none());
    }

    #[test]
    fn without_tokens_everyone_is_an_admin_with_the_process_csrf_token() {
        let access = Access::new(None);
        let v = access.visitor(None).unwrap();
        assert!(v.may_change_sweeps());
        assert_eq!(v.csrf.len(), 64);
    }
}
