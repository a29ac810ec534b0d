//! The real binary: SIGHUP applies a new configuration without dropping a request, refuses an
//! invalid one (the old keeps serving), and SIGTERM drains and exits 0.

mod support;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(30);

fn config_text(api_port: u16, extra: &str) -> String {
    format!(
        "domain = \"example.com\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[discovery.static]\nnodes = [\"127.0.0.1\"]\n{HEALTH}[routes.app]\nenabled = false\n[routes.files]\nenabled = false\n[routes.api]\nport = {api_port}\n{extra}"
    )
}

/// Waits for a log line containing `needle`; returns it.
async fn line_with(lines: &mut mpsc::UnboundedReceiver<String>, needle: &str) -> String {
    tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.recv().await {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("the proxy exited before logging {needle:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no log line with {needle:?}"))
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

#[tokio::test]
async fn sighup_reloads_without_dropping_requests_and_refuses_a_bad_file() {
    let api = Upstream::echo("127.0.0.1:0", "api").await;
    let grafana = Upstream::echo("127.0.0.1:0", "grafana").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, config_text(api.port(), "")).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_clearml-edge"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let pid = child.id().expect("pid");
    let (tx, mut lines) = mpsc::unbounded_channel();
    let stderr = child.stderr.take().unwrap();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            let _ = tx.send(line);
        }
    });
    let listening = line_with(&mut lines, "listening").await;
    let addr: std::net::SocketAddr = listening
        .rsplit("addr=")
        .next()
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("address in {listening:?}"));

    // Load on the api route all along.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = client();
            let mut sent = 0;
            while !stop.load(Ordering::SeqCst) && sent < 20_000 {
                let (status, _, _) =
                    send(&client, addr, Method::GET, "api.example.com", "/", full("")).await;
                assert_eq!(status, StatusCode::OK, "a request failed during reload");
                sent += 1;
            }
            sent
        })
    };

    assert_eq!(
        get(addr, "grafana.example.com", "/").await.0,
        StatusCode::NOT_FOUND
    );
    std::fs::write(
        &path,
        config_text(
            api.port(),
            &format!("[routes.grafana]\nport = {}\n", grafana.port()),
        ),
    )
    .unwrap();
    signal(pid, "HUP");
    line_with(&mut lines, "configuration reloaded").await;
    let (status, _, body) = get(addr, "grafana.example.com", "/").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"grafana"[..]));

    // A broken file is refused with the same precise error as `check`; the old one serves.
    std::fs::write(
        &path,
        config_text(api.port(), "[timeouts]\nconect = \"5s\"\n"),
    )
    .unwrap();
    signal(pid, "HUP");
    let refused = line_with(&mut lines, "reload refused").await;
    let detail = line_with(&mut lines, "conect").await;
    assert!(refused.contains("ERROR"), "{refused}");
    assert!(detail.contains("unknown field"), "{detail}");
    assert_eq!(
        get(addr, "grafana.example.com", "/").await.0,
        StatusCode::OK
    );

    stop.store(true, Ordering::SeqCst);
    let sent = load.await.expect("no request failed");
    assert!(sent > 0);

    signal(pid, "TERM");
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "{status}");
}
