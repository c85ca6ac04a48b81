//! The dashboard in a real browser: Debian's Chromium driven through chromedriver (WebDriver),
//! against `coordinator serve --http-listen` while CPU workers train two sweeps. The page must
//! update without a reload, show the numbers `sweep stats --json` gives, offer `sweep export`'s
//! files, link a black swan to its seed's curve and attempts, refuse visitors without a token,
//! let a viewer read but not pause, and refuse a forged CSRF token. Screenshots of the list,
//! sweep, seed and comparison pages go to target/dashboard-screenshots/.

use seedsweep_tests::{
    CoordinatorProcess, bin, free_port, make_synthetic, repo_root, run, stderr, stdout, worker,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WORKER: &str = "worker-token-for-the-dashboard-test";
const ADMIN: &str = "admin-token-for-the-dashboard-test";
const VIEWER: &str = "viewer-token-for-the-dashboard-test";

/// A headless Chromium session through chromedriver, ended on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Browser {
    fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver: install Debian's chromium and chromium-driver (scripts/test.sh does as root)");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while ureq::get(&format!("{base}/status")).call().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
            "goog:chromeOptions": {"args": ["--headless=new", "--no-sandbox",
                "--disable-dev-shm-usage", "--window-size=1280,1100"]}}}});
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
        };
        let reply = b.call("POST", "/session", caps);
        b.session = reply["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        b
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let reply = if method == "GET" {
            ureq::get(&url).call()
        } else {
            ureq::post(&url).send_json(body)
        };
        let text = reply
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
            .body_mut()
            .read_to_string()
            .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        v["value"].clone()
    }

    fn at(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    fn go(&self, url: &str) {
        self.call("POST", &self.at("/url"), json!({ "url": url }));
    }

    fn url(&self) -> String {
        self.call("GET", &self.at("/url"), json!({}))
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Runs `script` in the page; its return value.
    fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            &self.at("/execute/sync"),
            json!({"script": script, "args": []}),
        )
    }

    fn text(&self, css: &str) -> Option<String> {
        let q = serde_json::to_string(css).unwrap();
        self.js(&format!(
            "const e=document.querySelector({q});return e?e.textContent:null;"
        ))
        .as_str()
        .map(str::to_string)
    }

    fn click(&self, css: &str) {
        let q = serde_json::to_string(css).unwrap();
        self.js(&format!("document.querySelector({q}).click();"));
    }

    fn type_into(&self, css: &str, text: &str) {
        let found = self.call(
            "POST",
            &self.at("/element"),
            json!({"using": "css selector", "value": css}),
        );
        let element = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .expect("the element")
            .to_string();
        self.call(
            "POST",
            &self.at(&format!("/element/{element}/value")),
            json!({ "text": text }),
        );
    }

    fn wait_for(&self, what: &str, limit: Duration, mut cond: impl FnMut(&Browser) -> bool) {
        let deadline = Instant::now() + limit;
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The session cookie's `name=value`.
    fn cookie(&self) -> String {
        let c = self.call("GET", &self.at("/cookie/seedsweep_session"), json!({}));
        format!(
            "seedsweep_session={}",
            c["value"].as_str().expect("a session cookie")
        )
    }

    fn resize(&self, width: u32, height: u32) {
        let size = json!({ "width": width, "height": height });
        self.call("POST", &self.at("/window/rect"), size);
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let png = self.call("GET", &self.at("/screenshot"), json!({}));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        let dir = repo_root().join("target/dashboard-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Worker processes, killed if the test ends before they do (else they would go on delivering
/// to a coordinator that is gone).
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.0 {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

fn token_file(dir: &Path, name: &str, token: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path.to_str().unwrap().to_string()
}

/// `coordinator sweep ARGS` with the admin token.
fn admin(coordinator: &CoordinatorProcess, args: &[&str]) -> String {
    let out = run(Command::new(bin("coordinator"))
        .arg("sweep")
        .args(args)
        .args(["--coordinator", &coordinator.url])
        .env("SEEDSWEEP_ADMIN_TOKEN", ADMIN));
    assert!(out.status.success(), "sweep {args:?}: {}", stderr(&out));
    stdout(&out)
}

fn submit(coordinator: &CoordinatorProcess, dir: &Path, name: &str, seeds: &str) -> String {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!(
            "name = \"{name}\"\ntask = \"resnet9\"\ndataset = \"synthetic\"\nseeds = \"{seeds}\"\n\
             [train]\nepochs = 2\nbatch_size = 50\nwidth = 0.125\nlr = 0.2\nlr_peak_epoch = 0.5\n"
        ),
    )
    .unwrap();
    admin(coordinator, &["submit", file.to_str().unwrap()])
        .trim()
        .to_string()
}

/// An HTTP client that follows no redirect and hands back every status.
fn plain_http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into()
}

/// A plain HTTP POST of a form with `cookie`: the status code.
fn post_form(url: &str, cookie: &str, form: &[(&str, &str)]) -> u16 {
    let reply = plain_http()
        .post(url)
        .header("cookie", cookie)
        .send_form(form.iter().copied());
    reply.unwrap().status().as_u16()
}

/// The seed that diverges in [`SWANS`].
const DIVERGES: i64 = 7;

/// A test double of a training program (standard library and the helper only): every seed ends
/// near 0.9 but seed [`DIVERGES`], which collapses to 0.1, a black swan by either criterion.
const SWANS: &str = r#"
import seedsweep
s = seedsweep.seeds()
acc = 0.1 if s.seed == DIVERGES else 0.9 + 0.002 * (s.seed % 5)
for e in (1, 2):
    seedsweep.log_epoch(e, train_loss=1.0 / e, train_accuracy=acc, lr=0.1, test_loss=1.0, test_accuracy=acc)
seedsweep.finish(test_accuracy=acc, test_loss=1.0, train_loss=0.5, train_accuracy=acc)
"#;

/// Submits a 12-seed sweep of [`SWANS`]; its id.
fn swan_sweep(coordinator: &CoordinatorProcess, dir: &Path) -> String {
    let program = dir.join("swans.py");
    std::fs::write(&program, SWANS.replace("DIVERGES", &DIVERGES.to_string())).unwrap();
    let file = dir.join("swans.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"dashboard-swans\"\ntask = \"command\"\nseeds = \"0..12\"\n[command]\nargv = [\"python3\", {:?}]\nepochs = 2\n",
            program.to_str().unwrap()
        ),
    )
    .unwrap();
    admin(coordinator, &["submit", file.to_str().unwrap()])
        .trim()
        .to_string()
}

fn number(text: &str) -> f64 {
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number: `{text}`"))
}

#[test]
fn the_dashboard_shows_a_sweep_train_live_in_a_real_browser() {
    let _heavy = crate::heavy();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_synthetic(&data, 600, 200);
    let port = free_port();
    let dashboard = format!("http://127.0.0.1:{port}");
    let (w, a, v) = (
        token_file(dir.path(), "worker", WORKER),
        token_file(dir.path(), "admin", ADMIN),
        token_file(dir.path(), "viewer", VIEWER),
    );
    let db = format!("sqlite://{}", dir.path().join("s.db").display());
    let coordinator = CoordinatorProcess::start(
        &db,
        &[
            "--worker-token-file",
            &w,
            "--admin-token-file",
            &a,
            "--viewer-token-file",
            &v,
            "--http-listen",
            &format!("127.0.0.1:{port}"),
        ],
    )
    .unwrap();
    let first = submit(&coordinator, dir.path(), "dashboard-a", "0..8");
    let second = submit(&coordinator, dir.path(), "dashboard-b", "100..106");

    let browser = Browser::start();
    // Without a token: sent to sign in, and nothing of the sweep shown.
    browser.go(&format!("{dashboard}/sweeps/{first}"));
    assert!(browser.url().ends_with("/login"), "{}", browser.url());
    assert!(browser.text("main").unwrap().contains("Sign in"));
    browser.type_into("#token", WORKER);
    browser.click("form button");
    browser.wait_for("the refusal", Duration::from_secs(10), |b| {
        b.text("[role=alert]")
            .is_some_and(|t| t.contains("worker token"))
    });
    // A viewer signs in.
    browser.type_into("#token", VIEWER);
    browser.click("form button");
    browser.wait_for("the sweep list", Duration::from_secs(10), |b| {
        b.text("#sweeps")
            .is_some_and(|t| t.contains("dashboard-a") && t.contains("dashboard-b"))
    });

    // The sweep's page, then the workers: the count and the histogram arrive without a reload
    // (a mark set on the page survives).
    browser.go(&format!("{dashboard}/sweeps/{first}"));
    assert_eq!(browser.text("#done").as_deref(), Some("0"));
    assert!(
        browser
            .text("#live")
            .unwrap()
            .contains("No seed has finished yet")
    );
    browser.js("window.notReloaded = true;");
    let mut workers = Workers(
        (0..2)
            .map(|_| {
                worker(&coordinator.url, &data)
                    .env("SEEDSWEEP_WORKER_TOKEN", WORKER)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    browser.wait_for(
        "a first result on the page",
        Duration::from_secs(300),
        |b| {
            b.text("#done").is_some_and(|d| d != "0")
                && b.js("return document.querySelector('#live svg') !== null;") == json!(true)
        },
    );
    let first_seen = number(&browser.text("#done").unwrap());
    browser.wait_for("every seed on the page", Duration::from_secs(600), |b| {
        b.text("#done").as_deref() == Some("8")
    });
    assert!(first_seen < 8.0, "the page saw no result before the last");
    assert_eq!(
        browser.js("return window.notReloaded === true;"),
        json!(true),
        "the page reloaded"
    );
    browser.screenshot("sweep");

    // The page's numbers are `sweep stats --json`'s.
    let stats: Value =
        serde_json::from_str(&admin(&coordinator, &["stats", &first, "--json"])).unwrap();
    for field in ["mean", "std", "min", "max"] {
        let shown = number(&browser.text(&format!("[data-stat={field}]")).unwrap());
        let want = stats[field].as_f64().unwrap();
        assert!(
            (shown - want).abs() <= 5e-5 * want.abs().max(1.0),
            "{field}: page {shown}, stats {want}"
        );
    }
    assert_eq!(number(&browser.text("[data-stat=n]").unwrap()), 8.0);

    // A viewer may not pause: no button, and the request itself is refused.
    browser.go(&format!("{dashboard}/sweeps/{first}"));
    assert!(!browser.text("main").unwrap().contains("Pause"));
    let csrf = browser
        .js("return document.querySelector('input[name=csrf]').value;")
        .as_str()
        .unwrap()
        .to_string();
    let state = format!("{dashboard}/sweeps/{second}/state");
    let viewer = browser.cookie();
    assert_eq!(
        post_form(&state, &viewer, &[("csrf", &csrf), ("state", "paused")]),
        403
    );

    // An admin may, with the session's CSRF token and only with it.
    browser.go(&format!("{dashboard}/"));
    browser.click("nav form button");
    browser.wait_for("signed out", Duration::from_secs(10), |b| {
        b.url().ends_with("/login")
    });
    browser.type_into("#token", ADMIN);
    browser.click("form button");
    browser.wait_for("the list", Duration::from_secs(10), |b| {
        b.text("#sweeps").is_some()
    });
    let admin_cookie = browser.cookie();
    assert_ne!(admin_cookie, viewer);
    browser.go(&format!("{dashboard}/sweeps/{second}"));
    let admin_csrf = browser
        .js("return document.querySelector('input[name=csrf]').value;")
        .as_str()
        .unwrap()
        .to_string();
    for forged in ["", csrf.as_str(), "0000"] {
        assert_eq!(
            post_form(
                &state,
                &admin_cookie,
                &[("csrf", forged), ("state", "paused")]
            ),
            403
        );
    }
    assert_eq!(
        post_form(
            &state,
            &admin_cookie,
            &[("csrf", &admin_csrf), ("state", "active")]
        ),
        303
    );

    for w in &mut workers.0 {
        let status = w.wait().unwrap();
        assert!(status.success(), "a worker failed: {}", coordinator.log());
    }

    // The page's downloads are `sweep export`'s files, byte for byte.
    browser.go(&format!("{dashboard}/sweeps/{first}"));
    for (table, format) in [("results", "csv"), ("epochs", "parquet")] {
        let path = format!("/sweeps/{first}/export/{table}.{format}");
        assert!(
            browser.text(&format!("a[href='{path}']")).is_some(),
            "no link to {path}"
        );
        let mut reply = plain_http()
            .get(&format!("{dashboard}{path}"))
            .header("cookie", &admin_cookie)
            .call()
            .unwrap();
        assert_eq!(reply.status().as_u16(), 200, "{path}");
        let got = reply
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .unwrap();
        let file = dir.path().join(format!("exported.{format}"));
        let args = [
            "export", &first, "--table", table, "--format", format, "--out",
        ];
        admin(
            &coordinator,
            &[&args[..], &[file.to_str().unwrap()]].concat(),
        );
        assert_eq!(got, std::fs::read(&file).unwrap(), "{path}");
    }

    // A black swan's link opens its seed's curve and attempts.
    let swans = swan_sweep(&coordinator, dir.path());
    let out = run(worker(&coordinator.url, &data)
        .args([
            "--allow-command",
            "python3",
            "--pass-env",
            "PYTHONPATH",
            "--log-dir",
        ])
        .arg(dir.path().join("logs"))
        .env("PYTHONPATH", repo_root().join("python"))
        .env("SEEDSWEEP_WORKER_TOKEN", WORKER));
    assert!(out.status.success(), "{}", stderr(&out));
    browser.go(&format!("{dashboard}/sweeps/{swans}"));
    let swan = format!("#black-swans a[href='/sweeps/{swans}/seeds/{DIVERGES}']");
    assert!(
        browser.text(&swan).is_some(),
        "no black swan {DIVERGES}: {:?}",
        browser.text("#live")
    );
    browser.click(&swan);
    browser.wait_for("the black swan's page", Duration::from_secs(10), |b| {
        b.text("h1")
            .is_some_and(|h| h == format!("Seed {DIVERGES}"))
    });
    assert!(browser.text("main").unwrap().contains("Curve"));
    assert_eq!(browser.text("#seed-state").as_deref(), Some("done"));
    let attempts = browser.text("#attempts").expect("the attempts table");
    assert!(attempts.contains("succeeded"), "{attempts}");
    browser.screenshot("seed");

    // The list and the comparison.
    browser.go(&format!("{dashboard}/"));
    browser.wait_for("both sweeps done", Duration::from_secs(30), |b| {
        b.text("#sweeps")
            .is_some_and(|t| t.contains("8 / 8") && t.contains("6 / 6"))
    });
    // Each sweep's live summary: the first's mean and std as `sweep stats` gives them.
    let summary = format!(
        "{:.4} ± {:.4}",
        stats["mean"].as_f64().unwrap(),
        stats["std"].as_f64().unwrap()
    );
    let list = browser.text("#sweeps").unwrap();
    assert!(list.contains(&summary), "{summary} not in {list}");
    browser.screenshot("list");

    // At a phone's width the page does not scroll sideways (wide tables scroll in place).
    browser.resize(390, 844);
    browser.go(&format!("{dashboard}/sweeps/{first}"));
    let overflow = browser.js("return document.documentElement.scrollWidth - window.innerWidth;");
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "the page is {overflow} px too wide"
    );
    browser.screenshot("sweep-phone");
    browser.resize(1280, 1100);

    browser.go(&format!("{dashboard}/compare?a={first}&b={second}"));
    let compared: Value = serde_json::from_str(&admin(
        &coordinator,
        &["compare", &first, &second, "--json"],
    ))
    .unwrap();
    let shown = number(&browser.text("[data-stat=difference]").unwrap());
    let want = compared["difference"].as_f64().unwrap();
    assert!(
        (shown - want).abs() <= 5e-5,
        "difference: page {shown}, compare {want}"
    );
    browser.screenshot("compare");

    // An admin extends a sweep from the page's form; a range that is not one is refused.
    let extend = format!("{dashboard}/sweeps/{second}/extend");
    let form = |range| [("csrf", admin_csrf.as_str()), ("range", range)];
    assert_eq!(post_form(&extend, &admin_cookie, &form("6..")), 400);
    // The viewer's session ended when it signed out.
    let ended = post_form(&extend, &viewer, &[("csrf", &csrf), ("range", "106..108")]);
    assert_eq!(ended, 401);
    assert_eq!(post_form(&extend, &admin_cookie, &form("106..108")), 303);
    browser.go(&format!("{dashboard}/"));
    assert!(browser.text("#sweeps").unwrap().contains("6 / 8"));

    // Without a session, plain HTTP is sent to sign in too.
    let reply = plain_http()
        .get(&format!("{dashboard}/sweeps/{first}"))
        .call()
        .unwrap();
    assert_eq!(reply.status().as_u16(), 303);
}
