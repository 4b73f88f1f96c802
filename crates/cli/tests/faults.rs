//! Bad input and faults: each gets a clear error and the right status, and loses nothing.

mod common;

use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn message(body: &Value) -> String {
    body["error"]["message"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let d = Daemon::start_with(Options { extra_config: "max_file_bytes = 65536".into(), ..Default::default() }).await;
    let sb = d.create(json!({})).await;
    let id = sb["id"].as_str().unwrap().to_owned();

    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (json!({"template": "nope"}), StatusCode::NOT_FOUND, "unknown template"),
        (json!({"vcpus": 0}), StatusCode::BAD_REQUEST, "vcpus must be between 1 and"),
        (json!({"vcpus": 999}), StatusCode::BAD_REQUEST, "vcpus must be between 1 and"),
        (json!({"memory_mib": 1}), StatusCode::BAD_REQUEST, "memory_mib must be between"),
        (json!({"memory_mib": 10_000_000}), StatusCode::BAD_REQUEST, "memory_mib must be between"),
        (json!({"env": {"BAD-NAME": "x"}}), StatusCode::BAD_REQUEST, "invalid environment variable name"),
        (json!({"cpus": 2}), StatusCode::BAD_REQUEST, "unknown field"),
    ];
    for (body, status, text) in cases {
        let (got, err) = d.call(Method::POST, "/v1/sandboxes", Some(body.clone())).await;
        assert_eq!(got, status, "{body} -> {err}");
        assert!(message(&err).contains(text), "{body} -> {err}");
    }

    // Malformed JSON.
    let resp = d
        .request(Method::POST, "/v1/sandboxes")
        .header("content-type", "application/json")
        .body("{\"vcpus\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_request");
    assert!(message(&err).contains("invalid JSON"), "{err}");

    // Wrong or missing API key.
    let client = reqwest::Client::new();
    for key in [Some("tp_wrong"), None] {
        let mut req = client.get(format!("{}/v1/sandboxes", d.url));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let err: Value = resp.json().await.unwrap();
        assert!(message(&err).contains("API key"), "{err}");
    }

    // The API describes itself without a key.
    let doc: Value = client.get(format!("{}/v1/openapi.json", d.url)).send().await.unwrap().json().await.unwrap();
    assert!(doc["paths"]["/v1/sandboxes"].is_object());

    // Unknown ids, including ones that are not ids at all.
    for bad in ["sb-zzzzzzzzzz", "..%2F..%2Fetc", "x"] {
        for (method, path) in [
            (Method::GET, format!("/v1/sandboxes/{bad}")),
            (Method::POST, format!("/v1/sandboxes/{bad}/stop")),
            (Method::DELETE, format!("/v1/sandboxes/{bad}")),
        ] {
            let (status, err) = d.call(method.clone(), &path, None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {err}");
        }
        let (status, _) =
            d.call(Method::POST, &format!("/v1/sandboxes/{bad}/exec"), Some(json!({"argv": ["true"]}))).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    // Bad exec requests.
    let exec = format!("/v1/sandboxes/{id}/exec");
    for (body, text) in [
        (json!({"argv": []}), "argv must name a program"),
        (json!({"argv": ["true"], "timeout_secs": 0}), "timeout_secs"),
        (json!({"argv": ["true"], "cwd": "tmp"}), "must be absolute"),
        (json!({"argv": ["/no/such/program"]}), "cannot start"),
        (json!({"argv": ["true"], "user": "no-such-user"}), "no such user"),
    ] {
        let (status, err) = d.call(Method::POST, &exec, Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {err}");
        assert!(message(&err).contains(text), "{body} -> {err}");
    }

    // Relative or empty guest paths.
    for path in ["", "relative/file"] {
        let url = format!("/v1/sandboxes/{id}/files?path={path}");
        let resp = d.request(Method::PUT, &url).body("x").send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let resp = d.request(Method::GET, &url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert!(resp.text().await.unwrap().contains("guest path must"));
    }
    // A missing file is a 404.
    let resp = d.request(Method::GET, &format!("/v1/sandboxes/{id}/files?path=/no/such/file")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // Over the size limit, with and without a declared length: 413, and no file, not even a
    // temporary one, appears in the guest.
    let big = vec![7u8; 100_000];
    let url = format!("/v1/sandboxes/{id}/files?path=/root/up/big.bin");
    let resp = d.request(Method::PUT, &url).body(big.clone()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.chunks(8192).map(|c| Ok(c.to_vec())).collect();
    let resp = d
        .request(Method::PUT, &url)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE, "{}", resp.text().await.unwrap());
    let (code, out, _) = d.exec(&id, &["sh", "-c", "ls -A /root/up 2>/dev/null | wc -l"]).await;
    assert_eq!((code, String::from_utf8_lossy(&out).trim()), (Some(0), "0"), "upload left files behind");
    let (code, _, _) = d.exec(&id, &["sh", "-c", "head -c 100000 /dev/zero > /root/big"]).await;
    assert_eq!(code, Some(0));
    let resp = d.request(Method::GET, &format!("/v1/sandboxes/{id}/files?path=/root/big")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Nothing changed: still exactly one sandbox, running and working.
    assert_eq!(d.list_ids().await, vec![id.clone()]);
    assert_eq!(d.get(&id).await["state"], "running");
    assert_eq!(d.exec(&id, &["true"]).await.0, Some(0));
    let (status, _) = d.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_qemu_or_image_says_what_to_run() {
    // A QEMU the daemon looks up on PATH, missing at first.
    let name = format!("qemu-torpor-test-{}", std::process::id());
    let d = Daemon::start_with(Options { extra_config: format!("qemu = \"{name}\""), ..Default::default() }).await;
    let (status, err) = d.call(Method::POST, "/v1/sandboxes", Some(json!({}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(message(&err).contains("apt-get install qemu-system-x86"), "{err}");
    assert!(d.list_ids().await.is_empty());
    // Installed while the daemon runs: the next creates find it, with no restart.
    struct Installed(std::path::PathBuf);
    impl Drop for Installed {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let installed = Installed(std::path::Path::new("/usr/local/bin").join(&name));
    std::os::unix::fs::symlink("/usr/bin/qemu-system-x86_64", &installed.0).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let created = loop {
        let (status, body) = d.call(Method::POST, "/v1/sandboxes", Some(json!({}))).await;
        if status == StatusCode::CREATED {
            break body;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(std::time::Instant::now() < deadline, "QEMU, installed, was never found: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    drop(installed);
    assert_eq!(created["state"], "running");
    drop(d);

    let empty = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(Options { image_dir: Some(empty.path().to_path_buf()), ..Default::default() }).await;
    let (status, err) = d.call(Method::POST, "/v1/sandboxes", Some(json!({}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(message(&err).contains("torpor image build"), "{err}");
    assert!(d.list_ids().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_that_never_becomes_healthy_fails_create_and_leaves_nothing() {
    // The supervisor is replaced by a process that never answers.
    let d = Daemon::start_with(Options {
        extra_config: "boot_timeout_secs = 20\nkernel_args_extra = \"torpor.init=/bin/sleep -- infinity\"".into(),
        ..Default::default()
    })
    .await;
    let (status, err) = d.call(Method::POST, "/v1/sandboxes", Some(json!({}))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{err}");
    let text = message(&err);
    assert!(text.contains("did not become healthy"), "{text}");
    assert!(text.contains("torpor-initramfs: starting /bin/sleep"), "console tail missing: {text}");
    let id = text.split_whitespace().nth(1).unwrap().to_owned();
    assert!(torpor_api::is_valid_sandbox_id(&id), "{text}");
    assert!(d.list_ids().await.is_empty());
    assert_nothing_left(&d, &id, false);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_that_dies_is_failed_with_its_reason() {
    let d = Daemon::start().await;
    let sb = d.create(json!({})).await;
    let id = sb["id"].as_str().unwrap().to_owned();
    let pid = sb["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();

    let state = d.wait_for_state(&id, "failed", Duration::from_secs(10)).await;
    assert!(state["reason"].as_str().unwrap().contains("killed by signal 9"), "{state}");
    let (status, _) = d.call(Method::POST, &format!("/v1/sandboxes/{id}/exec"), Some(json!({"argv": ["true"]}))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = d.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_nothing_left(&d, &id, false);
}

#[tokio::test(flavor = "multi_thread")]
async fn daemon_restart_adopts_running_sandboxes() {
    let mut d = Daemon::start().await;
    let a = d.create(json!({})).await["id"].as_str().unwrap().to_owned();
    let b = d.create(json!({})).await;
    let (b, b_pid) = (b["id"].as_str().unwrap().to_owned(), b["pid"].as_u64().unwrap() as i32);
    // A process started before the restart must still be there after it.
    let (code, _, _) = d.exec(&a, &["sh", "-c", "sleep 1000 > /dev/null 2>&1 & echo $! > /root/bg.pid"]).await;
    assert_eq!(code, Some(0));
    // The console is written while nobody reads it (QEMU must shrug off the broken pipe).
    let writer = "nohup sh -c 'for i in $(seq 40); do echo tick-$i > /dev/ttyS0; sleep 0.25; done' >/dev/null 2>&1 &";
    let (code, _, _) = d.exec(&a, &["sh", "-c", writer]).await;
    assert_eq!(code, Some(0));

    d.kill_server();
    // While the daemon is down, b's VM dies.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(b_pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for("b's VM to exit", Duration::from_secs(10), || vm_pids(&b).is_empty()).await;
    d.spawn().await;

    let sa = d.get(&a).await;
    assert_eq!(sa["state"], "running", "{sa}");
    let (code, out, _) = d.exec(&a, &["sh", "-c", "kill -0 $(cat /root/bg.pid) && echo alive"]).await;
    assert_eq!((code, String::from_utf8_lossy(&out).trim()), (Some(0), "alive"));
    // The new daemon reads its console again.
    let (code, _, _) = d.exec(&a, &["sh", "-c", "echo after-restart > /dev/ttyS0"]).await;
    assert_eq!(code, Some(0));
    let console = d.sandbox_dir(&a).join("console.log");
    wait_for("the console after the restart", Duration::from_secs(30), || {
        std::fs::read_to_string(&console).is_ok_and(|t| t.contains("after-restart"))
    })
    .await;
    let sb = d.get(&b).await;
    assert_eq!(sb["state"], "failed", "{sb}");
    assert!(sb["reason"].as_str().unwrap().contains("could not adopt"), "{sb}");

    // The adopted VM is still watched: its death is noticed.
    let a_pid = sa["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(a_pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    d.wait_for_state(&a, "failed", Duration::from_secs(10)).await;

    for id in [&a, &b] {
        let (status, _) = d.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_nothing_left(&d, id, false);
    }
}

/// The guest answers health checks but never finishes writing its credentials (its root
/// filesystem frozen under their directory): a resume still returns, a daemon restart still
/// serves, and the sandbox can still be removed. Each call that waits on the guest has a
/// deadline; without them each of these waited forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_that_stalls_its_supervisor_holds_up_nothing() {
    let mut d = Daemon::start().await;
    let sb = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let id = sb["id"].as_str().unwrap().to_owned();
    let frozen = sh(
        &d,
        &id,
        "mkdir -p /var/stall && mount --bind /var/stall /run/torpor/credentials && fsfreeze -f / && echo frozen",
    )
    .await;
    assert_eq!(frozen, "frozen");

    let (status, body) = d.call(Method::POST, &format!("/v1/sandboxes/{id}/pause"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let path = format!("/v1/sandboxes/{id}/resume");
    let resume = d.call(Method::POST, &path, None);
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(120), resume).await.expect("the resume never returned");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(d.server_log().contains("delivering credentials failed"), "the stalled delivery must be reported");

    // Start-up adopts it without waiting on it (spawn fails if the API does not answer in 30 s).
    d.kill_server();
    d.spawn().await;
    assert_eq!(d.get(&id).await["state"], "running");

    let path = format!("/v1/sandboxes/{id}");
    let delete = d.call(Method::DELETE, &path, None);
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(120), delete).await.expect("the delete never returned");
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_nothing_left(&d, &id, false);
}

/// `torpor doctor` against a running daemon: everything checked, the exit status says whether
/// sandboxes can run, and a missing program comes with the command that installs it.
#[tokio::test(flavor = "multi_thread")]
async fn doctor_checks_the_host_and_names_fixes() {
    let d = Daemon::start().await;
    let config = d.config_path.to_str().unwrap().to_owned();
    let out = d.cli(&["doctor", "--config", &config], b"");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for line in ["ok    qemu-img", "ok    cgroups", "ok    nftables", "ok    guest image", "ok    API"] {
        assert!(text.contains(line), "{line:?} missing:\n{text}");
    }

    let broken = d.home.path().join("broken.toml");
    let original = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(&broken, format!("{original}\nqemu = \"qemu-not-installed-here\"\n")).unwrap();
    let out = d.cli(&["doctor", "--config", broken.to_str().unwrap()], b"");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("FAIL  qemu-not-installed-here") && text.contains("apt-get install qemu-system-x86"),
        "{text}"
    );
}

/// A local user's process that names a sandbox on its command line is not its VM: removing the
/// sandbox kills its VM (found through its cgroup) and leaves the impostor alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_names_a_sandbox_is_not_taken_for_its_vm() {
    use std::os::unix::process::CommandExt;
    let d = Daemon::start().await;
    let sb = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let id = sb["id"].as_str().unwrap().to_owned();
    let mut impostor = std::process::Command::new("python3")
        .args(["-c", "import time; time.sleep(600)", &format!("torpor-{id}")])
        .uid(65534)
        .spawn()
        .unwrap();
    let (status, _) = d.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(impostor.try_wait().unwrap().is_none(), "the impostor was killed as if it were the VM");
    impostor.kill().unwrap();
    impostor.wait().unwrap();
    assert_nothing_left(&d, &id, false);
}
