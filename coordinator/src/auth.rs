//! Who may call what. Bearer tokens carry one of three roles: `worker` (lease, heartbeat, epoch
//! metrics, complete, fail), `viewer` (reading sweeps: status, results, statistics, reports,
//! watching; the dashboard's read-only role) and `admin` (everything, including submitting,
//! pausing and cancelling sweeps).
//! The check runs as a tower layer in front of every gRPC service, before any handler, so a
//! refused call learns nothing about sweeps. The health and reflection services stay open:
//! cluster probes and generic clients call them without credentials.

use anyhow::bail;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::Status;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Worker,
    Viewer,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }
}

/// The role a gRPC method path needs; `None` for the open services.
pub fn required_role(path: &str) -> Option<Role> {
    const OPEN: [&str; 3] = [
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1.ServerReflection/",
        "/grpc.reflection.v1alpha.ServerReflection/",
    ];
    const WORKER: [&str; 5] = [
        "LeaseSeed",
        "Heartbeat",
        "StreamEpochMetrics",
        "CompleteSeed",
        "FailSeed",
    ];
    const READ: [&str; 8] = [
        "GetSweepStatus",
        "ListSweeps",
        "ListResults",
        "ListEpochMetrics",
        "GetSweepStats",
        "GetSweepReport",
        "CompareSweeps",
        "WatchSweep",
    ];
    if OPEN.iter().any(|p| path.starts_with(p)) {
        return None;
    }
    match path.strip_prefix("/seedsweep.v1.Coordinator/") {
        Some(method) if WORKER.contains(&method) => Some(Role::Worker),
        Some(method) if READ.contains(&method) => Some(Role::Viewer),
        _ => Some(Role::Admin),
    }
}

/// Who made a call, as the handlers see it (a request extension) and the logs name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// `ROLE:` and the first 8 hex digits of the token's SHA-256: names the token in logs
    /// without revealing it (and tells apart the old and new token during a rotation).
    pub token: String,
}

/// The accepted tokens. Each role may have several (one per line in its file), so that a token
/// can be rotated without stopping the fleet.
#[derive(Clone)]
pub struct Tokens {
    /// SHA-256 of each token with its role and log name. Comparing digests keeps the time a
    /// check takes independent of how much of a guess is right.
    known: Vec<([u8; 32], Caller)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.known.iter().map(|(_, c)| &c.token))
            .finish()
    }
}

impl Tokens {
    /// From the worker and admin tokens (each non-empty). The same token in both roles is
    /// refused: a worker host would then hold an admin's powers.
    pub fn new(worker: &[String], admin: &[String]) -> anyhow::Result<Tokens> {
        if worker.is_empty() || admin.is_empty() {
            bail!(
                "authentication needs both a worker token and an admin token (set both, or neither to serve on loopback only)"
            );
        }
        let mut known = Vec::new();
        for (role, tokens) in [(Role::Worker, worker), (Role::Admin, admin)] {
            for t in tokens {
                seedsweep_proto::client::check_token(t)?;
                let digest: [u8; 32] = Sha256::digest(t.as_bytes()).into();
                if known.iter().any(|(d, _)| *d == digest) {
                    bail!("the same token is given twice (worker and admin tokens must differ)");
                }
                let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
                let token = format!("{}:{hex}", role.as_str());
                known.push((digest, Caller { role, token }));
            }
        }
        Ok(Tokens { known })
    }

    /// Adds read-only viewer tokens (the dashboard's, and readers' over gRPC), each different
    /// from every other token.
    pub fn with_viewers(mut self, viewer: &[String]) -> anyhow::Result<Tokens> {
        for t in viewer {
            seedsweep_proto::client::check_token(t)?;
            let digest: [u8; 32] = Sha256::digest(t.as_bytes()).into();
            if self.known.iter().any(|(d, _)| *d == digest) {
                bail!(
                    "a viewer token is also given for another role: each role's tokens must differ"
                );
            }
            let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
            let token = format!("viewer:{hex}");
            let caller = Caller {
                role: Role::Viewer,
                token,
            };
            self.known.push((digest, caller));
        }
        Ok(self)
    }

    /// The caller a presented `authorization` header value names.
    pub fn identify(&self, header: Option<&str>) -> Result<&Caller, Status> {
        // The scheme's name is case-insensitive (RFC 7235).
        let token = header.and_then(|h| {
            let (scheme, rest) = h.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(rest)
        });
        let Some(token) = token else {
            return Err(Status::unauthenticated(
                "missing bearer token: send `authorization: Bearer TOKEN` (workers: --token-file or SEEDSWEEP_WORKER_TOKEN; admin commands: --token-file or SEEDSWEEP_ADMIN_TOKEN)",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        let mut found = None;
        for (d, caller) in &self.known {
            // Every entry is compared in full, whichever matches.
            let same = d.iter().zip(&digest).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
            if same {
                found = Some(caller);
            }
        }
        found.ok_or_else(|| Status::unauthenticated("the bearer token is not valid"))
    }

    /// Whether a call to `path` with this header may go ahead, and as whom.
    pub fn authorize(&self, path: &str, header: Option<&str>) -> Result<Option<Caller>, Status> {
        let Some(needed) = required_role(path) else {
            return Ok(None);
        };
        let caller = self.identify(header)?;
        let allowed = match needed {
            Role::Admin => caller.role == Role::Admin,
            Role::Viewer => caller.role != Role::Worker,
            Role::Worker => caller.role != Role::Viewer,
        };
        if !allowed {
            let wanted = match needed {
                Role::Viewer => "a viewer or admin token",
                Role::Worker => "a worker or admin token",
                Role::Admin => "an admin token",
            };
            return Err(Status::permission_denied(format!(
                "a {} token may not call {path}: it needs {wanted}",
                caller.role.as_str()
            )));
        }
        Ok(Some(caller.clone()))
    }
}

/// The tower layer that checks tokens (none: every call is let through).
#[derive(Clone)]
pub struct AuthLayer(pub Option<Arc<Tokens>>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<Tokens>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if let Some(tokens) = &self.tokens {
            let header = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            match tokens.authorize(req.uri().path(), header) {
                Ok(Some(caller)) => {
                    req.extensions_mut().insert(caller);
                }
                Ok(None) => {}
                Err(status) => {
                    tracing::warn!(path = req.uri().path(), code = ?status.code(), "call refused");
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        }
        Box::pin(self.inner.call(req))
    }
}

/// The log name of a request's caller (`-` when the coordinator runs without tokens).
pub fn caller_of<T>(req: &tonic::Request<T>) -> &str {
    req.extensions()
        .get::<Caller>()
        .map_or("-", |c| c.token.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(
            &[
                "worker-token-0123456789".into(),
                "worker-token-rotated-99".into(),
            ],
            &["admin-token-0123456789".into()],
        )
        .unwrap()
    }

    #[test]
    fn roles_follow_the_method() {
        assert_eq!(
            required_role("/seedsweep.v1.Coordinator/LeaseSeed"),
            Some(Role::Worker)
        );
        assert_eq!(
            required_role("/seedsweep.v1.Coordinator/SubmitSweep"),
            Some(Role::Admin)
        );
        assert_eq!(required_role("/grpc.health.v1.Health/Check"), None);
        assert_eq!(required_role("/other.Service/LeaseSeed"), Some(Role::Admin));
    }

    #[test]
    fn missing_wrong_and_underprivileged_tokens_are_refused() {
        let t = tokens();
        let lease = "/seedsweep.v1.Coordinator/LeaseSeed";
        let submit = "/seedsweep.v1.Coordinator/SubmitSweep";
        let code = |path, h| t.authorize(path, h).unwrap_err().code();
        assert_eq!(code(lease, None), tonic::Code::Unauthenticated);
        assert_eq!(
            code(lease, Some("Bearer nope-nope-nope-nope")),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(lease, Some("worker-token-0123456789")),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(submit, Some("Bearer worker-token-0123456789")),
            tonic::Code::PermissionDenied
        );
        let w = t
            .authorize(lease, Some("Bearer worker-token-rotated-99"))
            .unwrap()
            .unwrap();
        assert_eq!(w.role, Role::Worker);
        assert!(w.token.starts_with("worker:") && w.token.len() == 15);
        let a = t
            .authorize(lease, Some("Bearer admin-token-0123456789"))
            .unwrap()
            .unwrap();
        assert_eq!(a.role, Role::Admin);
        assert!(
            t.authorize(lease, Some("bearer admin-token-0123456789"))
                .is_ok()
        );
        assert_eq!(
            t.authorize("/grpc.health.v1.Health/Check", None).unwrap(),
            None
        );
    }

    #[test]
    fn viewers_read_and_nothing_else() {
        let t = tokens()
            .with_viewers(&["viewer-token-0123456789".into()])
            .unwrap();
        let viewer = Some("Bearer viewer-token-0123456789");
        let path = |m: &str| format!("/seedsweep.v1.Coordinator/{m}");
        for read in ["GetSweepStats", "ListResults", "WatchSweep"] {
            let v = t.authorize(&path(read), viewer).unwrap().unwrap();
            assert_eq!(v.role, Role::Viewer);
            assert!(
                t.authorize(&path(read), Some("Bearer worker-token-0123456789"))
                    .is_err(),
                "workers do not read sweeps"
            );
        }
        for other in ["SetSweepState", "SubmitSweep", "LeaseSeed", "CompleteSeed"] {
            let refused = t.authorize(&path(other), viewer).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{other}");
        }
        assert!(
            tokens()
                .with_viewers(&["admin-token-0123456789".into()])
                .is_err(),
            "a viewer token that is also an admin's"
        );
    }

    #[test]
    fn both_roles_are_needed_and_must_differ() {
        assert!(Tokens::new(&["worker-token-0123456789".into()], &[]).is_err());
        let same = "same-token-0123456789".to_string();
        assert!(Tokens::new(std::slice::from_ref(&same), std::slice::from_ref(&same)).is_err());
        assert!(Tokens::new(&["short".into()], &["admin-token-0123456789".into()]).is_err());
    }
}
