//! Who may drive a coordinator: every RPC x {no, wrong, worker, admin} token; TLS end to end with
//! certificates made here (server and client), a real sweep trained through it, the dashboard
//! under the same TLS; the loopback rule; and the open services beside them (health,
//! reflection, metrics).

use seedsweep_proto::v1 as pb;
use seedsweep_tests::{
    CoordinatorProcess, bin, free_port, make_synthetic, run, sqlite_query, stderr, stdout, worker,
};
use std::path::Path;
use std::process::Command;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const WORKER_TOKEN: &str = "worker-token-for-tests-0123456789";
const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";
const WORKER_METHODS: [&str; 5] = [
    "LeaseSeed",
    "Heartbeat",
    "StreamEpochMetrics",
    "CompleteSeed",
    "FailSeed",
];

/// Every RPC of the Coordinator service, read from the proto so a new one is covered too.
fn methods() -> Vec<String> {
    let proto = seedsweep_tests::repo_root().join("proto/seedsweep/v1/seedsweep.proto");
    let text = std::fs::read_to_string(proto).unwrap();
    let names: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| l.split('(').next().unwrap().trim().to_string())
        .collect();
    assert!(names.len() >= 16, "{names:?}");
    names
}

/// Writes the two token files; returns the flags naming them.
fn token_flags(dir: &Path) -> Vec<String> {
    let (w, a) = (dir.join("worker.token"), dir.join("admin.token"));
    std::fs::write(&w, format!("{WORKER_TOKEN}\n")).unwrap();
    std::fs::write(&a, format!("{ADMIN_TOKEN}\n")).unwrap();
    vec![
        "--worker-token-file".into(),
        w.display().to_string(),
        "--admin-token-file".into(),
        a.display().to_string(),
    ]
}

fn start(db: &Path, listen: &str, flags: &[String]) -> CoordinatorProcess {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let url = format!("sqlite://{}", db.display());
    CoordinatorProcess::start_on(&url, listen, &flags).unwrap()
}

/// Submits a small sweep NAME of SEEDS with the admin token from the environment; its id.
fn submit_as_admin(c: &CoordinatorProcess, dir: &Path, name: &str, seeds: &str) -> String {
    let file = dir.join(format!("{name}.toml"));
    let text = format!(
        "name = \"{name}\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nseeds = \"{seeds}\"\n"
    );
    std::fs::write(&file, text).unwrap();
    let submit = run(Command::new(bin("coordinator"))
        .args([
            "sweep",
            "submit",
            file.to_str().unwrap(),
            "--coordinator",
            &c.url,
        ])
        .env("SEEDSWEEP_ADMIN_TOKEN", ADMIN_TOKEN));
    assert!(submit.status.success(), "{}", stderr(&submit));
    stdout(&submit).trim().to_string()
}

async fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Calls `/seedsweep.v1.Coordinator/METHOD` with `request`'s bytes (an empty message decodes as
/// every field unset) and the token, if any; returns the status code and message.
async fn call<M: prost::Message + Send + Sync + 'static>(
    ch: &Channel,
    method: &str,
    request: M,
    token: Option<&str>,
) -> (Code, String) {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(request);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let path: tonic::codegen::http::uri::PathAndQuery =
        format!("/seedsweep.v1.Coordinator/{method}")
            .parse()
            .unwrap();
    let codec = tonic_prost::ProstCodec::<M, ()>::default();
    match grpc.unary(req, path, codec).await {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_checks_the_token_and_its_role() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(
        &dir.path().join("db"),
        "127.0.0.1:0",
        &token_flags(dir.path()),
    );
    let ch = channel(&c.url).await;
    let auth_codes = [Code::Unauthenticated, Code::PermissionDenied];
    for method in methods() {
        let for_workers = WORKER_METHODS.contains(&method.as_str());
        for (token, label) in [
            (None, "missing"),
            (Some("not-a-token-of-this-coordinator"), "wrong"),
            (Some(WORKER_TOKEN), "worker"),
            (Some(ADMIN_TOKEN), "admin"),
        ] {
            let (code, message) = call(&ch, &method, (), token).await;
            match label {
                "missing" | "wrong" => assert_eq!(
                    code,
                    Code::Unauthenticated,
                    "{method} with a {label} token: {message}"
                ),
                "worker" if !for_workers => assert_eq!(
                    code,
                    Code::PermissionDenied,
                    "{method} with a worker token: {message}"
                ),
                // Allowed through: the empty request is then refused on its merits.
                _ => assert!(
                    !auth_codes.contains(&code),
                    "{method} with a {label} token: {code:?} {message}"
                ),
            }
        }
    }

    // A refused call says the same whether the sweep exists or not.
    let id = submit_as_admin(&c, dir.path(), "s", "0..2");
    for token in [
        None,
        Some("not-a-token-of-this-coordinator"),
        Some(WORKER_TOKEN),
    ] {
        let ask = |sweep_id: String| pb::GetSweepStatusRequest { sweep_id };
        let existing = call(&ch, "GetSweepStatus", ask(id.clone()), token).await;
        let missing = call(
            &ch,
            "GetSweepStatus",
            ask(uuid::Uuid::new_v4().to_string()),
            token,
        )
        .await;
        assert_eq!(existing, missing, "token {token:?}");
    }

    // The command-line clients: a token from the environment or a file, never a flag.
    let list = |envs: &[(&str, &str)], args: &[&str]| {
        let mut cmd = Command::new(bin("coordinator"));
        cmd.args(["sweep", "list", "--coordinator", &c.url])
            .args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        run(&mut cmd)
    };
    let refused = list(&[], &[]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("missing bearer token"),
        "{}",
        stderr(&refused)
    );
    let as_worker = list(&[("SEEDSWEEP_ADMIN_TOKEN", WORKER_TOKEN)], &[]);
    assert!(
        stderr(&as_worker).contains("needs a viewer or admin token"),
        "{}",
        stderr(&as_worker)
    );
    let from_file = list(
        &[],
        &[
            "--token-file",
            dir.path().join("admin.token").to_str().unwrap(),
        ],
    );
    assert!(from_file.status.success(), "{}", stderr(&from_file));
    assert!(stdout(&from_file).contains(&id));
    let no_flag = list(&[], &["--token", ADMIN_TOKEN]);
    assert!(
        !no_flag.status.success(),
        "a token must not be accepted as an argument"
    );

    // The log names the caller's token by role and fingerprint, never the token itself.
    let log = c.log();
    assert!(log.contains("call refused"), "{log}");
    assert!(!log.contains(ADMIN_TOKEN) && !log.contains(WORKER_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_metrics_are_open() {
    let dir = tempfile::tempdir().unwrap();
    let port = seedsweep_tests::free_port();
    let mut flags = token_flags(dir.path());
    flags.extend(["--metrics-listen".into(), format!("127.0.0.1:{port}")]);
    let c = start(&dir.path().join("db"), "127.0.0.1:0", &flags);
    let ch = channel(&c.url).await;

    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for service in ["", "seedsweep.v1.Coordinator"] {
        let mut answer = None;
        // The first database check runs right after start.
        for _ in 0..50 {
            let r = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            answer = Some(r.status);
            if r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(
            answer,
            Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
        );
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(ch.clone());
    let ask = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([ask]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"seedsweep.v1.Coordinator".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    // Metrics: the database's view of a sweep, and this replica's counters.
    let id = submit_as_admin(&c, dir.path(), "m", "0..3");
    let mut client = pb::coordinator_client::CoordinatorClient::with_interceptor(
        ch,
        |mut r: tonic::Request<()>| {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {WORKER_TOKEN}").parse().unwrap(),
            );
            Ok(r)
        },
    );
    let leased = client
        .lease_seed(pb::LeaseSeedRequest {
            worker_id: "w1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        leased.outcome,
        Some(pb::lease_seed_response::Outcome::Lease(_))
    ));
    let page = scrape(port);
    assert!(
        page.contains(&format!(
            "seedsweep_seeds{{sweep=\"{id}\",name=\"m\",state=\"pending\"}} 2"
        )),
        "{page}"
    );
    assert!(
        page.contains(&format!(
            "seedsweep_seeds{{sweep=\"{id}\",name=\"m\",state=\"leased\"}} 1"
        )),
        "{page}"
    );
    assert!(page.contains("seedsweep_leases_granted_total 1"), "{page}");
    assert!(page.contains("seedsweep_claim_seconds_count 1"), "{page}");
    assert!(page.contains("seedsweep_workers_connected 1"), "{page}");
    assert!(page.contains("seedsweep_leases_expired 0"), "{page}");
    assert!(page.contains("seedsweep_results_total 0"), "{page}");
}

/// GET /metrics with a bare HTTP/1.1 request.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[test]
fn without_tokens_only_loopback_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("db").display());
    let refused = run(Command::new(bin("coordinator")).args([
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--database-url",
        &url,
    ]));
    assert!(!refused.status.success());
    let err = stderr(&refused);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without authentication")
            && err.contains("--insecure"),
        "{err}"
    );
    assert!(
        !dir.path().join("db").exists(),
        "nothing is created before the check"
    );

    let open = start(&dir.path().join("db"), "0.0.0.0:0", &["--insecure".into()]);
    assert!(
        open.log().contains("WITHOUT authentication"),
        "{}",
        open.log()
    );
    drop(open);
    let with_tokens = start(
        &dir.path().join("db"),
        "0.0.0.0:0",
        &token_flags(dir.path()),
    );
    assert!(!with_tokens.log().contains("WITHOUT authentication"));

    // `coordinator config` reports the same decision, with the tokens masked.
    let config = run(Command::new(bin("coordinator"))
        .args(["config", "--listen", "0.0.0.0:7000"])
        .env("SEEDSWEEP_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SEEDSWEEP_WORKER_TOKEN", WORKER_TOKEN)
        .env("SEEDSWEEP_DATABASE_URL", "postgres://u:hunter2@db:5432/s"));
    assert!(config.status.success(), "{}", stderr(&config));
    let text = stdout(&config);
    assert!(text.contains("listen = \"0.0.0.0:7000\"  # flag"), "{text}");
    assert!(
        text.contains("database-url = \"postgres://u:***@db:5432/s\"  # environment"),
        "{text}"
    );
    assert!(
        !text.contains("hunter2") && !text.contains(ADMIN_TOKEN),
        "{text}"
    );
    let unsafe_config =
        run(Command::new(bin("coordinator")).args(["config", "--listen", "0.0.0.0:7000"]));
    assert!(!unsafe_config.status.success());
}

/// Certificates for one test: a CA, the server's for `localhost`, a client's.
struct Pki {
    ca: std::path::PathBuf,
    server: (std::path::PathBuf, std::path::PathBuf),
    client: (std::path::PathBuf, std::path::PathBuf),
}

fn make_pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "seedsweep test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let leaf = |name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).unwrap();
        (
            write(&format!("{name}.pem"), cert.pem()),
            write(&format!("{name}.key"), key.serialize_pem()),
        )
    };
    let server = leaf(
        "server",
        vec!["localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let client = leaf("client", Vec::new(), ExtendedKeyUsagePurpose::ClientAuth);
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        server,
        client,
    }
}

#[test]
fn a_sweep_runs_over_tls_with_client_certificates_and_tokens() {
    let _heavy = crate::heavy();
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let p = |p: &Path| p.display().to_string();
    let mut flags = token_flags(dir.path());
    flags.extend([
        "--tls-cert".into(),
        p(&pki.server.0),
        "--tls-key".into(),
        p(&pki.server.1),
        "--tls-client-ca".into(),
        p(&pki.ca),
    ]);
    let dashboard_port = free_port();
    flags.extend([
        "--http-listen".into(),
        format!("127.0.0.1:{dashboard_port}"),
    ]);
    let db = dir.path().join("db");
    let c = start(&db, "127.0.0.1:0", &flags);
    // The certificate names localhost, so the clients must too.
    let url = c.url.replace("http://127.0.0.1", "https://localhost");
    let admin = |args: &[&str], client_cert: bool| {
        let mut cmd = Command::new(bin("coordinator"));
        cmd.arg("sweep")
            .args(args)
            .args(["--coordinator", &url, "--tls-ca", &p(&pki.ca)])
            .env("SEEDSWEEP_ADMIN_TOKEN", ADMIN_TOKEN);
        if client_cert {
            cmd.args([
                "--tls-client-cert",
                &p(&pki.client.0),
                "--tls-client-key",
                &p(&pki.client.1),
            ]);
        }
        run(&mut cmd)
    };

    let data = dir.path().join("data");
    make_synthetic(&data, 200, 100);
    let file = dir.path().join("s.toml");
    std::fs::write(&file, "name = \"tls\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nseeds = \"0..2\"\n[train]\nepochs = 1\nbatch_size = 50\nwidth = 0.125\n").unwrap();
    let submit = admin(&["submit", file.to_str().unwrap()], true);
    assert!(submit.status.success(), "{}\n{}", stderr(&submit), c.log());
    let id = stdout(&submit).trim().to_string();

    // Without a client certificate, or in plain text, nothing gets through.
    let no_cert = admin(&["list"], false);
    assert!(
        !no_cert.status.success(),
        "the server requires a client certificate"
    );
    let plain = run(Command::new(bin("coordinator"))
        .args(["sweep", "list", "--coordinator", &c.url])
        .env("SEEDSWEEP_ADMIN_TOKEN", ADMIN_TOKEN));
    assert!(
        !plain.status.success(),
        "plain text must not reach a TLS server"
    );

    let token = dir.path().join("worker.token");
    let out = run(worker(&url, &data)
        .args([
            "--tls-ca",
            &p(&pki.ca),
            "--tls-client-cert",
            &p(&pki.client.0),
            "--tls-client-key",
            &p(&pki.client.1),
        ])
        .arg("--token-file")
        .arg(&token));
    assert!(
        out.status.success(),
        "worker failed: {}\n{}",
        stderr(&out),
        c.log()
    );
    let status = admin(&["status", &id, "--json"], true);
    let s: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(s["counts"]["done"], 2, "{s}");
    let rows = sqlite_query(&db, "SELECT count(*) FROM results");
    assert_eq!(rows.trim(), "2");
    // Lease events name the worker's token by its fingerprint.
    assert!(c.log().contains("token=\"worker:"), "{}", c.log());

    dashboard_under_tls(dashboard_port, &pki.ca);
}

/// The dashboard serves the coordinator's certificate: a browser that trusts the CA signs in
/// and gets a `Secure` cookie and the sweep list; plain HTTP and a client that does not trust
/// the CA get nothing.
fn dashboard_under_tls(port: u16, ca: &Path) {
    use ureq::tls::{Certificate, RootCerts, TlsConfig};
    let ca = Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let tls = TlsConfig::builder()
        .root_certs(RootCerts::new_with_certs(&[ca]))
        .build();
    let browser: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let base = format!("https://localhost:{port}");
    let mut login = browser.get(&format!("{base}/login")).call().unwrap();
    assert_eq!(login.status().as_u16(), 200);
    assert!(
        login
            .body_mut()
            .read_to_string()
            .unwrap()
            .contains("Sign in")
    );
    let signed = browser
        .post(&format!("{base}/login"))
        .send_form([("token", ADMIN_TOKEN)])
        .unwrap();
    assert_eq!(signed.status().as_u16(), 303);
    let cookie = signed.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap();
    let mut list = browser
        .get(&format!("{base}/"))
        .header("cookie", session)
        .call()
        .unwrap();
    assert_eq!(list.status().as_u16(), 200);
    assert!(list.body_mut().read_to_string().unwrap().contains(">tls<"));

    let plain = ureq::get(&format!("http://127.0.0.1:{port}/login")).call();
    assert!(plain.is_err(), "plain HTTP reached the TLS dashboard");
    let untrusting = ureq::get(&format!("{base}/login")).call();
    assert!(
        untrusting.is_err(),
        "a client without the CA accepted the certificate"
    );
}
