//! `vaultd serve` over TLS behind real proxies: HAProxy in front of port
//! 9999, passing the TLS through after a PROXY protocol header of version
//! 2, with its CRC32c TLV, or 1 (`send-proxy-v2 proxy-v2-options crc32c`,
//! `send-proxy`), and nginx in front of the HTTP
//! shim, which it reaches over TLS, appending to `X-Forwarded-For`
//! (`$proxy_add_x_forwarded_for`). Each proxy connects
//! from an address of its own (127.0.0.2, 127.0.0.3), which `vaultd`
//! trusts (`--proxy-protocol-from`, `--trusted-proxy`); the partner
//! connects from 127.0.0.1. A policy that allows only 127.0.0.1 then
//! passes through the proxies only if the vault reads what they say, and a
//! client that writes its own `X-Forwarded-For` is checked at its real
//! address. A `vaultd shim` of its own, behind HAProxy in HTTP mode,
//! reads RFC 7239's `Forwarded` (`--forwarded-header forwarded`) the same
//! way.
//!
//! `haproxy` and `nginx` come from the system's packages (`.ci/run`
//! installs them); without them on `PATH` the test says so and passes.

mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::DevServer;

/// The address HAProxy connects to the vault from.
const TCP_PROXY: &str = "127.0.0.2";
/// The address nginx connects to the shim from.
const HTTP_PROXY: &str = "127.0.0.3";
/// The address HAProxy connects to a `vaultd shim` from, adding
/// `Forwarded`.
const FORWARDED_PROXY: &str = "127.0.0.4";

/// `program` on `PATH`, or in the `sbin` dirs where Debian puts it (not on
/// every user's `PATH`), if it runs.
fn program(name: &str) -> Option<std::path::PathBuf> {
    let runs = |p: &Path| {
        Command::new(p)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file() && runs(p))
}

/// A port that was free a moment ago, for a proxy's configuration.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Waits until `addr` accepts connections (30 s at most).
fn wait_listening(addr: &str) {
    let started = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing listens on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A proxy process, stopped when dropped: SIGTERM, so that nginx's master
/// stops its workers too (a SIGKILL would leave them running, orphaned),
/// then SIGKILL if it is still there after 10 s.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy in TCP mode on `v2` and `v1` in front of the vault at `vault`,
/// sending PROXY headers of version 2 (with a CRC32c TLV, which the vault
/// checks) and 1 from [`TCP_PROXY`].
fn haproxy(exe: &Path, dir: &Path, vault: &str, v2: u16, v1: u16) -> Proxy {
    run_haproxy(
        exe,
        &dir.join("haproxy.cfg"),
        "tcp",
        &format!(
            "frontend v2\n    bind 127.0.0.1:{v2}\n    default_backend v2\n\
             frontend v1\n    bind 127.0.0.1:{v1}\n    default_backend v1\n\
             backend v2\n    server vault {vault} send-proxy-v2 proxy-v2-options crc32c source {TCP_PROXY}\n\
             backend v1\n    server vault {vault} send-proxy source {TCP_PROXY}\n"
        ),
    )
}

/// HAProxy in HTTP mode on `port` in front of the shim at `shim`, adding
/// a `Forwarded` line that names the client (HAProxy 2.6 has no `option
/// forwarded`, which came with 2.8).
fn haproxy_forwarded(exe: &Path, dir: &Path, shim: &str, port: u16) -> Proxy {
    run_haproxy(
        exe,
        &dir.join("haproxy-forwarded.cfg"),
        "http",
        &format!(
            "frontend web\n    bind 127.0.0.1:{port}\n\
                 http-request add-header Forwarded for=%[src]\n    default_backend shim\n\
             backend shim\n    server shim {shim} source {FORWARDED_PROXY}\n"
        ),
    )
}

/// HAProxy in the foreground, in `mode`, with `proxies` (its frontends and
/// backends) written to `cfg`.
fn run_haproxy(exe: &Path, cfg: &Path, mode: &str, proxies: &str) -> Proxy {
    std::fs::write(
        cfg,
        format!(
            "global\n    maxconn 64\n\
             defaults\n    mode {mode}\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
             {proxies}"
        ),
    )
    .expect("the HAProxy configuration");
    let child = Command::new(exe)
        .arg("-db")
        .arg("-f")
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start haproxy");
    Proxy(child)
}

/// nginx on `port` in front of the shim at `shim` (TLS, with the dev CA
/// in `ca`).
fn nginx(exe: &Path, dir: &Path, shim: &str, ca: &Path, port: u16) -> Proxy {
    let d = dir.display();
    let ca = ca.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\nevents {{}}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
                 proxy_pass https://{shim};\n      proxy_bind {HTTP_PROXY};\n\
                 proxy_ssl_verify on;\n      proxy_ssl_trusted_certificate {ca};\n\
                 proxy_ssl_name localhost;\n      proxy_ssl_protocols TLSv1.3;\n\
                 proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n  }}\n}}\n"
        ),
    )
    .expect("nginx.conf");
    let child = Command::new(exe)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    Proxy(child)
}

/// Status and JSON body of an HTTP request, with extra headers.
fn call(
    method: &str,
    url: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = ureq::request(method, url).set("Authorization", &format!("Bearer {key}"));
    for (name, value) in headers {
        req = req.set(name, value);
    }
    support::http(req, body.map(|b| b.to_string()).as_deref())
}

#[test]
fn behind_haproxy_and_nginx_the_partner_s_own_address_is_checked() {
    let (Some(haproxy_exe), Some(nginx_exe)) = (program("haproxy"), program("nginx")) else {
        eprintln!("proxies: haproxy or nginx is not installed; skipped");
        return;
    };
    let scratch = tempfile::tempdir().expect("tempdir");
    let dir = scratch.path().join("vault");
    // The demo data, keys and TLS files of `vaultd dev --tls`, then
    // `vaultd serve` on them.
    let dev = DevServer::start_with(&dir, &["--tls"]);
    let key = |role: &str| dev.get(&format!("{role}_api_key"));
    let (admin, partner, auditor) = (key("admin"), key("partner"), key("auditor"));
    let (subject, purpose) = (dev.get("demo_subject_id"), dev.get("demo_purpose"));
    assert!(dev.stop().success());
    let mut cmd = Command::new(support::binary("fintrust-server", "vaultd"));
    support::serve_dev_tls_args(&mut cmd, &dir);
    cmd.args(["--proxy-protocol-from", TCP_PROXY])
        .args(["--trusted-proxy", HTTP_PROXY]);
    let ca = dir.join("dev-ca.pem");
    let vaultd = support::Vaultd::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));

    let (v2, v1, web) = (free_port(), free_port(), free_port());
    let _haproxy = haproxy(&haproxy_exe, scratch.path(), &vaultd.protocol, v2, v1);
    let _nginx = nginx(&nginx_exe, scratch.path(), &vaultd.http, &ca, web);
    for port in [v2, v1, web] {
        wait_listening(&format!("127.0.0.1:{port}"));
    }
    // Every HTTP request goes through nginx: the admin's and the
    // auditor's routes do not look at the source address.
    let proxied = format!("http://127.0.0.1:{web}");
    let set_sources = |networks: Value| {
        let url = format!("{proxied}/v1/policies/demo-lender");
        let (status, mut policy) = call("GET", &url, &admin, &[], None);
        assert_eq!(status, 200, "{policy}");
        let mut policy = policy["policy"].take();
        policy["source_ips"] = networks;
        let (status, body) = call("PUT", &url, &admin, &[], Some(policy));
        assert_eq!(status, 200, "{body}");
    };
    let authorize = |headers: &[(&str, &str)]| {
        let ask = json!({"subject_id": subject, "purpose": purpose});
        call(
            "POST",
            &format!("{proxied}/v1/authorize"),
            &partner,
            headers,
            Some(ask),
        )
    };
    let ca_file = ca.to_str().expect("a UTF-8 path");
    let redeem = |port: u16, token: &str| {
        let out = support::vault_client(&[
            "redeem",
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--cacert",
            ca_file,
            "--api-key",
            &partner,
            "--token",
            token,
        ]);
        (Some(out.code), out.stderr)
    };

    // Only the partner's own address: through nginx it is granted (the
    // shim reads nginx's X-Forwarded-For; nginx itself is 127.0.0.3), and
    // through HAProxy, with either header version, it redeems.
    set_sources(json!(["127.0.0.1"]));
    for port in [v2, v1] {
        let (status, grant) = authorize(&[]);
        assert_eq!(status, 200, "{grant}");
        let token = grant["token"].as_str().expect("token");
        let (code, stderr) = redeem(port, token);
        assert_eq!(code, Some(0), "redeem through port {port}: {stderr}");
    }

    // Now only 192.0.2.0/24. A client that claims that network in its own
    // X-Forwarded-For is refused at its real address; a token granted
    // before is refused at redemption through HAProxy.
    let (status, grant) = authorize(&[]);
    assert_eq!(status, 200, "{grant}");
    let token = grant["token"].as_str().expect("token").to_string();
    set_sources(json!(["192.0.2.0/24"]));
    let (status, body) = authorize(&[("X-Forwarded-For", "192.0.2.7")]);
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("source_not_allowed")),
        "{body}"
    );
    let (code, stderr) = redeem(v2, &token);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("source_not_allowed"), "{stderr}");

    // The audit trail names the partner's address, and the HTTP proxy.
    let (status, logs) = call(
        "GET",
        &format!("{proxied}/v1/logs?kind=access_denied"),
        &auditor,
        &[],
        None,
    );
    assert_eq!(status, 200, "{logs}");
    let denials: Vec<&Value> = logs["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| &e["payload"])
        .filter(|p| p["reason"] == "source_not_allowed")
        .collect();
    assert_eq!(denials.len(), 2, "{logs}");
    assert_eq!(denials[0]["action"], "authorize");
    assert_eq!(denials[0]["source_ip"], "127.0.0.1");
    assert_eq!(denials[0]["proxy_ip"], HTTP_PROXY);
    assert_eq!(denials[1]["action"], "redeem");
    assert_eq!(denials[1]["source_ip"], "127.0.0.1");
    assert_eq!(denials[1]["proxy_ip"], TCP_PROXY);

    // RFC 7239's Forwarded: a `vaultd shim` of its own, in front of the
    // same vault, that reads it from HAProxy in HTTP mode.
    let (status, created) = call(
        "POST",
        &format!("{proxied}/v1/credentials"),
        &admin,
        &[],
        Some(json!({"role": "gateway", "name": "edge-shim"})),
    );
    assert_eq!(status, 201, "{created}");
    let key_file = scratch.path().join("gateway.key");
    std::fs::write(&key_file, created["api_key"].as_str().expect("api_key")).expect("key file");
    let mut cmd = Command::new(support::binary("fintrust-server", "vaultd"));
    support::shim_args(&mut cmd, &vaultd.protocol, &key_file);
    cmd.arg("--cacert")
        .arg(&ca)
        .args(["--trusted-proxy", FORWARDED_PROXY])
        .args(["--forwarded-header", "forwarded"]);
    let shim = support::Vaultd::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));
    let forwarding = free_port();
    let _haproxy_http = haproxy_forwarded(&haproxy_exe, scratch.path(), &shim.http, forwarding);
    wait_listening(&format!("127.0.0.1:{forwarding}"));
    let through_haproxy = |headers: &[(&str, &str)]| {
        let ask = json!({"subject_id": subject, "purpose": purpose});
        let url = format!("http://127.0.0.1:{forwarding}/v1/authorize");
        call("POST", &url, &partner, headers, Some(ask))
    };
    // The policy allows 192.0.2.0/24 alone: a client that names that
    // network in a Forwarded line of its own, or in X-Forwarded-For
    // (which this shim does not read), is checked at its real address.
    let spoofed = [
        ("Forwarded", "for=192.0.2.7;proto=https"),
        ("X-Forwarded-For", "192.0.2.7"),
    ];
    let (status, body) = through_haproxy(&spoofed);
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("source_not_allowed")),
        "{body}"
    );
    let (_, logs) = call(
        "GET",
        &format!("{proxied}/v1/logs?kind=access_denied"),
        &auditor,
        &[],
        None,
    );
    let last = &logs["events"]
        .as_array()
        .expect("events")
        .last()
        .expect("a denial")["payload"];
    assert_eq!(last["source_ip"], "127.0.0.1", "{last}");
    assert_eq!(last["proxy_ip"], FORWARDED_PROXY, "{last}");
    // The client's own address allowed: granted through HAProxy.
    set_sources(json!(["127.0.0.1"]));
    let (status, grant) = through_haproxy(&spoofed);
    assert_eq!(status, 200, "{grant}");
    assert!(shim.stop().success());

    // A connection from HAProxy's address without a header is refused.
    let sock = without_header(&vaultd.protocol);
    assert!(sock.is_empty(), "answered without a header: {sock:?}");
    assert!(vaultd.stop().success());
}

/// Connects to `addr` from [`TCP_PROXY`] and sends a `Hello`-looking
/// frame with no PROXY header; what the server answers before it closes.
fn without_header(addr: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let addr: SocketAddr = addr.parse().expect("addr");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tcp = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind(SocketAddr::new(TCP_PROXY.parse().expect("ip"), 0))
            .expect("bind");
        s.connect(addr)
            .await
            .expect("connect")
            .into_std()
            .expect("std")
    });
    let mut tcp = tcp;
    tcp.set_nonblocking(false).expect("blocking");
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let hello = protocol::encode_frame(
        1,
        &protocol::Message::Hello {
            api_key: "fvk_x".into(),
            client: "no header".into(),
        },
        0,
    )
    .expect("frame");
    let _ = tcp.write_all(&hello);
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    out
}
