//! Templates: processes already running at create, clones that are their own machines.

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

const TEMPLATE: &str = r#"
[env]
GREETING = "from the template"

[[file]]
path = "/srv/app/index.html"
content = "hello from a template\n"

[[run]]
command = "echo built > /srv/app/build-marker && date +%s%N > /srv/app/built-at"

[[process]]
name = "web"
command = "exec python3 -m http.server 8000 --bind 127.0.0.1 --directory /srv/app"
ready = "python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/')\""
ready_timeout_secs = 120
"#;

const FETCH: &str = "python3 -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/index.html').read().decode(), end='')\"";

#[tokio::test(flavor = "multi_thread")]
async fn a_template_build_snapshots_running_processes_and_clones_are_unique() {
    let d = Daemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("web.toml");
    std::fs::write(&file, TEMPLATE).unwrap();
    let out = d.cli(&["template", "build", "web", "-f", file.to_str().unwrap()], b"");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), d.server_log());
    // The build VM is consumed by the capture.
    assert!(d.list_ids().await.is_empty());
    let (_, list) = d.call(Method::GET, "/v1/templates", None).await;
    let web = list["templates"].as_array().unwrap().iter().find(|t| t["name"] == "web").cloned().unwrap();
    assert_eq!(web["processes"], json!(["torpor-guest", "web"]));

    let a = d.create(json!({ "template": "web", "idle_timeout_secs": 0 })).await;
    let b = d.create(json!({ "template": "web", "idle_timeout_secs": 0 })).await;
    let (a, b) = (a["id"].as_str().unwrap().to_owned(), b["id"].as_str().unwrap().to_owned());

    // The server was running before create returned: the very first exec finds it serving, and
    // it is the process the template started, not a new one.
    for id in [&a, &b] {
        let (code, out, err) = d.exec(id, &["sh", "-c", FETCH]).await;
        assert_eq!(code, Some(0), "{}", String::from_utf8_lossy(&err));
        assert_eq!(out, b"hello from a template\n");
        let (_, out, _) = d.exec(id, &["sh", "-c", "cat /srv/app/build-marker; echo $GREETING"]).await;
        assert_eq!(String::from_utf8_lossy(&out), "built\nfrom the template\n");
    }

    // Each clone is its own machine.
    let identity =
        "hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address; head -c 16 /dev/urandom | od -An -tx1";
    let (_, ia, _) = d.exec(&a, &["sh", "-c", identity]).await;
    let (_, ib, _) = d.exec(&b, &["sh", "-c", identity]).await;
    let (ia, ib) = (String::from_utf8(ia).unwrap(), String::from_utf8(ib).unwrap());
    let (la, lb): (Vec<&str>, Vec<&str>) = (ia.lines().collect(), ib.lines().collect());
    assert_eq!(la[0], a);
    assert_eq!(lb[0], b);
    for (i, what) in ["hostname", "machine-id", "MAC", "random bytes"].iter().enumerate() {
        assert_ne!(la[i], lb[i], "clones share their {what}");
    }
    let secret = |id: &str| std::fs::read_to_string(d.sandbox_dir(id).join("secret")).unwrap();
    assert_ne!(secret(&a), secret(&b));

    // A clone writes to its own disk and memory: the other does not see it.
    let (code, _, _) = d.exec(&a, &["sh", "-c", "echo only-a > /srv/app/index.html"]).await;
    assert_eq!(code, Some(0));
    assert_eq!(d.exec(&b, &["sh", "-c", FETCH]).await.1, b"hello from a template\n");

    // Clones pause and resume like any sandbox, with the process still there.
    for action in ["pause", "resume"] {
        let (status, body) = d.call(Method::POST, &format!("/v1/sandboxes/{b}/{action}"), None).await;
        assert_eq!(status, StatusCode::OK, "{action}: {body}");
    }
    assert_eq!(d.exec(&b, &["sh", "-c", FETCH]).await.1, b"hello from a template\n");

    // A cold start begins from a fresh supervisor, not the snapshot: the template's environment
    // must come with it.
    for action in ["stop", "start"] {
        let (status, body) = d.call(Method::POST, &format!("/v1/sandboxes/{b}/{action}"), None).await;
        assert_eq!(status, StatusCode::OK, "{action}: {body}");
    }
    let (_, out, _) = d.exec(&b, &["sh", "-c", "cat /srv/app/build-marker; echo $GREETING"]).await;
    assert_eq!(String::from_utf8_lossy(&out), "built\nfrom the template\n");

    // A template in use cannot be removed; unused, it can.
    let (status, err) = d.call(Method::DELETE, "/v1/templates/web", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    for id in [&a, &b] {
        assert_eq!(d.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await.0, StatusCode::NO_CONTENT);
        assert_nothing_left(&d, id, false);
    }
    assert_eq!(d.call(Method::DELETE, "/v1/templates/web", None).await.0, StatusCode::NO_CONTENT);
    let (status, _) = d.call(Method::POST, "/v1/sandboxes", Some(json!({ "template": "web" }))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_build_step_reports_its_command_and_output_and_leaves_nothing() {
    let d = Daemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[[run]]\ncommand = \"echo about to fail; echo the reason >&2; exit 3\"\n").unwrap();
    let out = d.cli(&["template", "build", "bad", "-f", file.to_str().unwrap()], b"");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exit Some(3)") && err.contains("echo about to fail"), "{err}");
    assert!(err.contains("about to fail") && err.contains("the reason"), "{err}");
    assert!(d.list_ids().await.is_empty(), "the build VM was left behind");
    let (_, list) = d.call(Method::GET, "/v1/templates", None).await;
    assert!(list["templates"].as_array().unwrap().iter().all(|t| t["name"] != "bad"));

    // Asking a template for another size is refused with its real size.
    std::fs::write(&file, "[[run]]\ncommand = \"true\"\n").unwrap();
    assert!(d.cli(&["template", "build", "tiny", "-f", file.to_str().unwrap()], b"").status.success());
    let (status, err) = d.call(Method::POST, "/v1/sandboxes", Some(json!({ "template": "tiny", "vcpus": 2 }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("1 vCPU / 512 MiB"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn template_builds_refuse_what_would_fail_late_before_booting_anything() {
    let d = Daemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fails = |args: &[&str], expect: &[&str]| {
        let out = d.cli(args, b"");
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        for e in expect {
            assert!(err.contains(e), "{args:?}: {err:?} lacks {e:?}");
        }
    };
    // No file and no shipped template of that name: the shipped ones are listed.
    fails(&["template", "build", "nope"], &["no template called \"nope\" ships", "coder"]);
    // The shipped coder template asks for model access, which this daemon cannot give: refused
    // by the daemon at the build VM's create, not after the build.
    fails(&["template", "build", "coder"], &["no model upstream configured"]);
    // A CA file that is not a certificate.
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    fails(&["template", "build", "coder", "--ca-cert", not_pem.to_str().unwrap()], &["not a PEM certificate"]);
    // A sandbox policy with a typo, found before the build rather than at the capture.
    let file = dir.path().join("t.toml");
    std::fs::write(&file, "[network]\nmode = \"allowlist\"\nallow_domains = [\"exa mple.com\"]\n").unwrap();
    fails(
        &["template", "build", "t", "-f", file.to_str().unwrap()],
        &["checking the template's defaults", "exa mple.com"],
    );
    assert!(d.list_ids().await.is_empty(), "a build VM was created");
    // The check endpoint itself: good defaults pass, the name of the endpoint is taken.
    let (status, _) = d.call(Method::POST, "/v1/templates/check", Some(json!({"name": "fine"}))).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, err) = d.call(Method::POST, "/v1/templates/check", Some(json!({"name": "check"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let (status, err) = d.call(Method::POST, "/v1/templates", Some(json!({"name": "fine"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(err.to_string().contains("sandbox"), "{err}");
}
