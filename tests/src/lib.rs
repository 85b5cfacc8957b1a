//! Helpers for the end-to-end tests: run real client tools, wait for replication to catch up, and
//! compare images. The deployment itself is `sr_devkit`, the same code `srctl quickstart` uses.

use anyhow::{bail, Context};
pub use sr_devkit::{bin_dir, Component, ControlPlane, DiskSpec, Local, Options, Proc};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs a tool and returns its stdout; a failure carries the command, status and output.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (install it: see .ci/run)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed with {}:\n{}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `qemu-io` on a raw image, an `nbd://` URI or an `nbds://...?tls-certificates=DIR` URI with
/// one `-c` per command; its output, or why it failed.
pub fn qemu_io(uri: &str, cmds: &[String]) -> anyhow::Result<String> {
    let image = sr_devkit::qemu_image(uri, "tls0")?;
    let mut args: Vec<&str> = Vec::new();
    for o in &image.objects {
        args.extend(["--object", o]);
    }
    args.extend(["--image-opts", &image.opts]);
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    run("qemu-io", &args)
}

/// The sum of a Prometheus metric's samples (all label sets) at component `c`'s `/metrics`.
pub fn metric(local: &Local, c: Component, name: &str) -> anyhow::Result<f64> {
    let text = local.metrics(c)?;
    Ok(text
        .lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// A sparse disk image of `size` bytes.
pub fn make_disk(path: &Path, size: u64) -> anyhow::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    Ok(())
}

/// Checks `f` every 50 ms until it gives a value, for at most `timeout`: the one polling loop.
fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `f` gives a value, checking every 50 ms, and returns it; panics naming `what` after
/// `timeout`. With [`wait_for`], the one place tests poll: every wait is on a condition, never a fixed
/// sleep.
#[track_caller]
pub fn wait_until<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    match poll(timeout, f) {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Waits until `f` holds, checking every 50 ms; panics naming `what` after `timeout`.
#[track_caller]
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    wait_until(what, timeout, || f().then_some(()))
}

/// Waits until the initial copy is done and the master target has applied the agent's last change of
/// every disk. Returns the applied sequence numbers.
pub fn wait_caught_up(local: &Local, timeout: Duration) -> anyhow::Result<Vec<u64>> {
    let mut last_err = String::new();
    let applied = poll(timeout, || {
        caught_up(local).unwrap_or_else(|e| {
            last_err = format!("{e:#}");
            None
        })
    });
    match applied {
        Some(v) => Ok(v),
        None => {
            let st = local.agent_status().map(|s| s.to_string()).unwrap_or(last_err);
            bail!("replication did not catch up within {timeout:?}; agent status: {st}");
        }
    }
}

/// Whether the initial copy is done and the master target applied the agent's last change of every
/// disk (then the applied sequence numbers).
pub fn caught_up(local: &Local) -> anyhow::Result<Option<Vec<u64>>> {
    let st = local.agent_status()?;
    let mut out = Vec::new();
    for d in st["disks"].as_array().context("status has no disks")? {
        let id = d["id"].as_u64().context("disk id")?;
        let last = d["last_seq"].as_u64().context("last_seq")?;
        if d["initial_copy"]["done"] != true
            || d["dirty_bytes"].as_u64().unwrap_or(0) > 0
            || d["overflow"] == true
            || d["resync"]["active"] == true
        {
            return Ok(None);
        }
        let applied = local.applied(id)?;
        if applied < last {
            return Ok(None);
        }
        out.push(applied);
    }
    Ok(Some(out))
}

/// `qemu-img compare` of two raw images (or NBD URIs, `nbds://` with their certificates); an error
/// says where they differ.
pub fn compare(a: &str, b: &str) -> anyhow::Result<()> {
    let args = sr_devkit::qemu_compare_args(a, b)?;
    run("qemu-img", &args.iter().map(String::as_str).collect::<Vec<_>>()).map(|_| ())
}

/// Checks the master target's apply record of a disk, read a page at a time (pages of 1000, so a
/// long record is read across pages): batches contiguous from 1, none applied twice.
pub fn check_apply_log(local: &Local, disk: u64) -> anyhow::Result<u64> {
    let mut expect = 1u64;
    let mut after = 0u64;
    loop {
        let page = format!("/v1/apply-log?item=1&disk={disk}&after={after}&limit=1000");
        let log = local.get(Component::MasterTarget, &page)?;
        for b in log["batches"].as_array().context("no batches")? {
            let (f, l) = (b[0].as_u64().context("first")?, b[1].as_u64().context("last")?);
            if f != expect || l < f {
                bail!("apply record broken at batch {f}..={l}: expected it to start at {expect} (a batch applied twice or skipped)");
            }
            expect = l + 1;
        }
        match log["next_after"].as_u64() {
            Some(n) => after = n,
            None => return Ok(expect - 1),
        }
    }
}

/// A temporary directory for one test; kept (and its path printed) when `SR_KEEP_TEST_DIR` is set.
pub struct TestDir {
    _tmp: Option<tempfile::TempDir>,
    path: std::path::PathBuf,
}

impl TestDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub fn test_dir() -> TestDir {
    let d = tempfile::tempdir().expect("creating a temporary directory");
    if std::env::var_os("SR_KEEP_TEST_DIR").is_some() {
        let path = d.keep();
        eprintln!("test directory kept: {}", path.display());
        return TestDir { _tmp: None, path };
    }
    TestDir { path: d.path().to_path_buf(), _tmp: Some(d) }
}

/// A stand-in HTTP endpoint (webhook, OTLP collector): accepts requests on loopback, answers 200 and
/// keeps each whole request (head and body, as Content-Length says) as raw bytes.
pub fn http_receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let addr = l.local_addr().expect("bound address");
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let g = g.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut req = Vec::new();
                let mut buf = [0u8; 65536];
                loop {
                    let n = s.read(&mut buf).unwrap_or(0);
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    let need = text.split_once("\r\n\r\n").map(|(head, _)| {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        head.len() + 4 + len
                    });
                    if n == 0 || need.is_some_and(|need| req.len() >= need) {
                        break;
                    }
                }
                g.lock().expect("receiver lock").push(req);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            });
        }
    });
    (addr, got)
}

/// Calls the configuration server's API; the answer's status and JSON body (a string when not JSON).
pub fn call(
    api: &ControlPlane,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let b = body.map(|v| v.to_string());
    let client = api.client(token.unwrap_or_default()).expect("API client");
    let client = if token.is_some() { client } else { client.without_token() };
    let (code, text) = client.request(api.api, method, path, b.as_deref()).expect("API call");
    (code, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text.clone())))
}

/// Runs srctl; killed after two minutes so a job that never ends fails the test instead of hanging it.
pub fn srctl(api: &ControlPlane, token_file: &Path, args: &[&str]) -> std::process::Output {
    Command::new("timeout")
        .arg("120")
        .arg(sr_devkit::bin_dir().join("srctl"))
        .args(["--server", &api.api.to_string(), "--token-file"])
        .arg(token_file)
        .arg("--ca")
        .arg(api.ca())
        .args(args)
        .output()
        .expect("running srctl")
}

/// The newest item of `machine`, as `srctl items list` shows it (null when there is none).
pub fn item_of(api: &ControlPlane, admin_file: &Path, machine: &str) -> serde_json::Value {
    let out = srctl(api, admin_file, &["--output", "json", "items", "list"]).stdout;
    let items: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    items.as_array().into_iter().flatten().rev().find(|i| i["machine"] == machine).cloned().unwrap_or_default()
}

/// A configuration server, and sites (agent, process server, master target) registered with it.
pub struct Deployment {
    pub cp: sr_devkit::ControlPlane,
    pub admin_file: std::path::PathBuf,
    pub admin: String,
    /// An NBD client certificate (libnbd's layout) for the master targets' exports.
    pub nbd_certs: std::path::PathBuf,
    cs: Option<Proc>,
}

impl Deployment {
    pub fn start(dir: &Path) -> Deployment {
        let cp = sr_devkit::ControlPlane::create(&dir.join("cp")).expect("control plane config");
        Deployment::on(cp, dir)
    }

    /// Starts the configuration server `cp` (its files under `dir`/cp) and takes an NBD client
    /// certificate from it.
    pub fn on(cp: sr_devkit::ControlPlane, dir: &Path) -> Deployment {
        let cs = cp.start().expect("starting the configuration server");
        Deployment { cs: Some(cs), ..Deployment::attach(cp, dir) }
    }

    /// A deployment around the running configuration server `cp` (which someone else stops).
    pub fn attach(cp: sr_devkit::ControlPlane, dir: &Path) -> Deployment {
        let admin_file = cp.root.join("cs").join("admin.token");
        let admin = cp.admin_token().expect("admin token");
        let nbd_certs = dir.join("nbd-client");
        let (csr, key) = sr_common::ca::make_csr("tests").expect("a CSR");
        let v = cp
            .client(&admin)
            .expect("API client")
            .post_json(cp.api, "/v1/nbd-clients", &serde_json::json!({ "name": "tests", "csr_pem": csr }))
            .expect("an NBD client certificate");
        let field = |k: &str| v[k].as_str().expect("certificate fields").to_string();
        sr_common::register::write_nbd_client_dir(&nbd_certs, &field("ca_pem"), &field("certificate_pem"), &key)
            .expect("writing the NBD client certificate");
        Deployment { cp, admin_file, admin, nbd_certs, cs: None }
    }

    /// An `nbds://` URI the API described, with the tests' NBD client certificate.
    pub fn with_certs(&self, uri: &str) -> String {
        format!("{uri}?tls-certificates={}", self.nbd_certs.display())
    }

    /// Registers a site's components (node names start with `site`) for one disk at `disk`.
    pub fn site(&self, dir: &Path, site: &str, disk: &Path) -> Local {
        Local::managed_site(
            dir,
            vec![DiskSpec { id: 1, name: "disk0".into(), path: disk.to_path_buf() }],
            &Options::default(),
            &self.cp,
            &self.admin,
            site,
        )
        .expect("test deployment")
    }

    /// SIGKILLs the configuration server and starts it again.
    pub fn restart_cs(&mut self) {
        if let Some(cs) = self.cs.take() {
            cs.kill();
        };
        self.cs = Some(self.cp.start().expect("starting the configuration server"));
    }

    pub fn srctl(&self, args: &[&str]) -> String {
        let out = srctl(&self.cp, &self.admin_file, args);
        assert!(
            out.status.success(),
            "srctl {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn api(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        call(&self.cp, method, path, body, Some(&self.admin))
    }

    pub fn item(&self, id: u64) -> serde_json::Value {
        self.api("GET", &format!("/v1/items/{id}"), None).1
    }

    pub fn wait_machine(&self, name: &str) {
        wait_for(&format!("agent {name} to report"), Duration::from_secs(30), || {
            let (_, m) = self.api("GET", "/v1/machines", None);
            m.as_array().expect("test deployment").iter().any(|m| m["name"] == name)
        });
    }

    /// Waits until component `name` has reported within the component timeout (a master target or
    /// process server a reprotect should pick must be live, and an agent can report before it).
    pub fn wait_healthy(&self, name: &str) {
        wait_for(&format!("{name} to report"), Duration::from_secs(30), || {
            let (_, c) = self.api("GET", "/v1/components", None);
            c.as_array().expect("test deployment").iter().any(|c| c["name"] == name && c["health"] == "healthy")
        });
    }

    /// Protects `machine` under policy "p" (created on first use); returns the item id.
    pub fn protect(&self, machine: &str) -> u64 {
        self.wait_machine(machine);
        let (_, policies) = self.api("GET", "/v1/policies", None);
        if policies.as_array().expect("test deployment").is_empty() {
            self.srctl(&["policies", "create", "--name", "p"]);
        }
        self.srctl(&["protect", "--machine", machine, "--policy", "p", "--watch"]);
        item_of(&self.cp, &self.admin_file, machine)["id"].as_u64().expect("test deployment")
    }

    /// Waits for a job to end; its record. Panics with the job's error when it failed and `ok` is set.
    pub fn wait_job(&self, job: u64, ok: bool) -> serde_json::Value {
        let j = wait_until(&format!("job {job} to end"), Duration::from_secs(180), || {
            let (_, j) = self.api("GET", &format!("/v1/jobs/{job}"), None);
            (j["state"] != "running").then_some(j)
        });
        assert!(!ok || j["state"] == "succeeded", "job {job} did not succeed: {j}");
        j
    }
}

/// A tmpfs of `size` mounted at `path` for the test's lifetime (the tests run as root, like CI).
pub struct Tmpfs(pub std::path::PathBuf);

impl Tmpfs {
    pub fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("creating the mount point");
        let at = path.to_str().expect("a UTF-8 test path");
        run("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", at])
            .expect("mounting a small tmpfs (the data-safety tests run as root)");
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some(at) = self.0.to_str() {
            let _ = run("umount", &["-l", at]);
        }
    }
}
