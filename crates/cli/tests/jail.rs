//! The VM process's jail and limits, checked where they can be seen: in /proc, in the cgroup
//! files, as the VM's uid on the host, and from inside real guests pushing against them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::Daemon;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn status_field(pid: u64, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("{key} missing from /proc/{pid}/status"))
}

/// The cgroup files of sandbox `id` holding `v2_file` (unified) or `v1_file` (legacy `ctrl`).
fn cgroup_file(id: &str, ctrl: &str, v1_file: &str, v2_file: &str) -> PathBuf {
    let v2 = Path::new("/sys/fs/cgroup/torpor").join(format!("torpor-{id}"));
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        v2.join(v2_file)
    } else {
        Path::new("/sys/fs/cgroup").join(ctrl).join("torpor").join(format!("torpor-{id}")).join(v1_file)
    }
}

fn read_trimmed(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())).trim().to_owned()
}

/// Checks everything /proc says about the sandbox's VM process; returns its uid.
fn assert_jailed(d: &Daemon, sandbox: &Value) -> u32 {
    let id = sandbox["id"].as_str().unwrap();
    let pid = sandbox["pid"].as_u64().expect("a running sandbox has a VM pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains(&format!("torpor-{id}")), "pid {pid} is not {id}'s VM");

    let uids: Vec<u32> = status_field(pid, "Uid").split_whitespace().map(|u| u.parse().unwrap()).collect();
    assert!(uids.iter().all(|u| *u == uids[0] && *u != 0), "the VM must run as one unprivileged uid: {uids:?}");
    let gids: Vec<u32> = status_field(pid, "Gid").split_whitespace().map(|g| g.parse().unwrap()).collect();
    assert!(gids.iter().all(|g| *g != 0), "the VM must run with an unprivileged gid: {gids:?}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps} of the VM");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2", "QEMU's seccomp filter must be on");
    for ns in ["mnt", "pid", "ipc", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "the VM must have its own {ns} namespace");
    }

    // Its cgroup, with the limits the API reports.
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroups.contains(&format!("/torpor/torpor-{id}")), "not in its cgroup: {cgroups}");
    let limits = &sandbox["limits"];
    let memory = read_trimmed(&cgroup_file(id, "memory", "memory.limit_in_bytes", "memory.max"));
    assert_eq!(memory, limits["memory_bytes"].as_u64().unwrap().to_string());
    assert!(limits["memory_bytes"].as_u64().unwrap() > sandbox["memory_mib"].as_u64().unwrap() << 20);
    let cpu = read_trimmed(&cgroup_file(id, "cpu", "cpu.cfs_quota_us", "cpu.max"));
    assert_eq!(cpu.split_whitespace().next().unwrap(), limits["cpu_quota_us"].as_u64().unwrap().to_string());
    assert_eq!(limits["cpu_quota_us"].as_u64(), Some(sandbox["vcpus"].as_u64().unwrap() * 100_000));
    let pids = read_trimmed(&cgroup_file(id, "pids", "pids.max", "pids.max"));
    assert_eq!(pids, limits["pids"].as_u64().unwrap().to_string());

    // What it can see: its own run directory, none of the daemon's other files, no host PIDs.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let data_dir = d.home.path().strip_prefix("/").unwrap();
    assert!(root.join(data_dir).join("sandboxes").join(id).join("disk.qcow2").exists(), "its own disk must be visible");
    for hidden in ["api-key", "torpor.db", "config.toml"] {
        assert!(!root.join(data_dir).join(hidden).exists(), "{hidden} is visible to the VM");
    }
    let etc: Vec<String> = std::fs::read_dir(root.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(etc, vec!["ld.so.cache".to_owned()], "the VM's /etc");
    for absent in ["root", "home", "boot", "var/lib", "run/netns"] {
        assert!(!root.join(absent).exists(), "/{absent} is visible to the VM");
    }
    let pids: Vec<String> = std::fs::read_dir(root.join("proc"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        .collect();
    assert_eq!(pids, vec!["1".to_owned()], "the VM's /proc must show only itself");

    // Nothing of the daemon's environment, which holds a sentinel.
    let daemon_env = std::fs::read(format!("/proc/{}/environ", d.server_pid())).unwrap();
    assert!(String::from_utf8_lossy(&daemon_env).contains(common::ENV_SENTINEL));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(environ.is_empty(), "the VM inherited {:?}", String::from_utf8_lossy(&environ));

    // No network of its own: its namespace has only a loopback that is down, so a socket it
    // opens after an escape reaches nothing (the guest's traffic goes through the tap it was
    // handed, and the sandbox's firewall).
    let links = nsenter_net(pid, &["ip", "-o", "link"]);
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:") && !links.contains("UP"), "{links}");
    assert!(nsenter_net(pid, &["ip", "-4", "route"]).trim().is_empty());

    // Its control socket is the daemon's, in a directory the VM cannot write: it can neither
    // replace it nor point it at another sandbox's.
    let dir = d.sandbox_dir(id);
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let qmp = std::fs::symlink_metadata(dir.join("qmp.sock")).unwrap();
    assert!(qmp.file_type().is_socket() && qmp.uid() == 0, "qmp.sock must be root's socket");
    let run_dir = std::fs::metadata(&dir).unwrap();
    assert_eq!((run_dir.uid(), run_dir.permissions().mode() & 0o777), (0, 0o710));
    let (ok, err) = as_uid(uids[0], "ln", &["-sf", "/dev/null", dir.join("qmp.sock").to_str().unwrap()]);
    assert!(!ok && err.contains("Permission denied"), "the VM uid replaced its control socket: {err}");
    let (ok, _) = as_uid(uids[0], "touch", &[dir.join("new-file").to_str().unwrap()]);
    assert!(!ok, "the VM uid created a file in its run directory");
    uids[0]
}

/// Runs a command in the network namespace of `pid`; its stdout.
fn nsenter_net(pid: u64, argv: &[&str]) -> String {
    let out = Command::new("nsenter").arg("-n").arg("-t").arg(pid.to_string()).args(argv).output().unwrap();
    assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command on the host as `uid`: (succeeded, stderr).
fn as_uid(uid: u32, program: &str, args: &[&str]) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let out = Command::new(program).args(args).uid(uid).gid(uid).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs `cat path` on the host as `uid`; true if it could read it.
fn can_read_as(uid: u32, path: &Path) -> (bool, String) {
    as_uid(uid, "cat", &[path.to_str().unwrap()])
}

#[tokio::test]
async fn the_vm_process_is_jailed() {
    let d = Daemon::start().await;
    let a = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let b = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let uid_a = assert_jailed(&d, &a);
    let uid_b = assert_jailed(&d, &b);
    assert_ne!(uid_a, uid_b, "two sandboxes must not share a VM uid");

    // As A's VM uid on the host: nothing of the daemon's or of B's.
    let (ok, _) = can_read_as(uid_a, Path::new("/etc/hostname"));
    assert!(ok, "the probe itself must work (a world-readable file)");
    let b_dir = d.sandbox_dir(b["id"].as_str().unwrap());
    for file in [
        d.home.path().join("api-key"),
        d.home.path().join("torpor.db"),
        b_dir.join("disk.qcow2"),
        b_dir.join("mem.ram"),
        b_dir.join("secret"),
    ] {
        let (ok, err) = can_read_as(uid_a, &file);
        assert!(!ok && err.contains("Permission denied"), "uid {uid_a} read {}: {err}", file.display());
    }
    // The daemon's own files are private to it.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for file in [d.home.path().join("api-key"), d.home.path().join("torpor.db")] {
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o077, 0, "{} is open to others", file.display());
        assert_eq!(meta.uid(), 0);
    }
    let dir_mode = std::fs::metadata(d.home.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700, "the data directory");
}

#[tokio::test]
async fn the_jail_survives_pause_and_resume_and_rm_leaves_nothing() {
    let d = Daemon::start().await;
    let sandbox = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let id = sandbox["id"].as_str().unwrap().to_owned();
    let uid = assert_jailed(&d, &sandbox);

    let (status, body) = d.call(Method::POST, &format!("/v1/sandboxes/{id}/pause"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Paused: no VM, no cgroup; the files it left are the daemon's or its own VM uid's.
    assert!(
        !cgroup_file(&id, "memory", "memory.limit_in_bytes", "memory.max").exists(),
        "a paused sandbox keeps no cgroup"
    );
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for entry in std::fs::read_dir(d.sandbox_dir(&id)).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        assert!(meta.uid() == 0 || meta.uid() == uid, "{:?} belongs to uid {}", entry.path(), meta.uid());
        assert_eq!(meta.permissions().mode() & 0o007, 0, "{:?} is open to everyone", entry.path());
    }
    let (status, body) = d.call(Method::POST, &format!("/v1/sandboxes/{id}/resume"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let resumed = d.get(&id).await;
    assert_ne!(resumed["pid"], sandbox["pid"]);
    assert_eq!(assert_jailed(&d, &resumed), uid, "the same VM uid after a resume");
    let (code, out, _) = d.exec(&id, &["uname", "-n"]).await;
    assert_eq!((code, String::from_utf8_lossy(&out).trim()), (Some(0), id.as_str()));

    let (status, _) = d.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    common::assert_nothing_left(&d, &id, false);
    assert!(
        !cgroup_file(&id, "memory", "memory.limit_in_bytes", "memory.max").exists(),
        "the cgroup must go with the sandbox"
    );
}

#[tokio::test]
async fn memory_hogs_fork_bombs_and_full_disks_stay_inside_the_guest() {
    let d = Daemon::start().await;
    let hog = d.create(json!({ "idle_timeout_secs": 0, "disk_mib": 160 })).await;
    let bomb = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let witness = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let hog_id = hog["id"].as_str().unwrap().to_owned();
    assert_eq!(hog["limits"]["disk_bytes"].as_u64(), Some(160 << 20));

    // Memory: allocating past the guest's RAM is the guest's problem (its OOM killer or a
    // MemoryError); the VM lives on, inside its cgroup's limit.
    let (code, _, err) =
        d.exec(&hog_id, &["python3", "-c", "x = []\nwhile True: x.append(b'\\x01' * (32 << 20))"]).await;
    // Endless, every page written: it ends only when the guest's OOM killer (or malloc) says so.
    assert_ne!(code, Some(0), "an endless allocation ended well: {}", String::from_utf8_lossy(&err));
    let (code, _, _) = d.exec(&hog_id, &["true"]).await;
    assert_eq!(code, Some(0), "the sandbox must survive its memory hog");
    let used: u64 =
        read_trimmed(&cgroup_file(&hog_id, "memory", "memory.max_usage_in_bytes", "memory.peak")).parse().unwrap();
    assert!(used <= hog["limits"]["memory_bytes"].as_u64().unwrap(), "the VM used {used} bytes, past its limit");

    // A fork bomb burns the guest, not the host: the daemon answers and another sandbox works.
    let bomb_id = bomb["id"].as_str().unwrap().to_owned();
    let (code, _, _) = d
        .exec(&bomb_id, &["sh", "-c", "nohup timeout -s KILL 30 bash -c 'f() { f | f & }; f' >/dev/null 2>&1 & true"])
        .await;
    assert_eq!(code, Some(0));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    for _ in 0..5 {
        let health = client.get(format!("{}/v1/health", d.url)).send().await.expect("the daemon must keep answering");
        assert!(health.status().is_success());
        let (code, _, _) = d.exec(witness["id"].as_str().unwrap(), &["true"]).await;
        assert_eq!(code, Some(0), "another sandbox must keep working during a fork bomb");
    }
    let pids_now: u64 = read_trimmed(&cgroup_file(&bomb_id, "pids", "pids.current", "pids.current")).parse().unwrap();
    assert!(
        pids_now <= bomb["limits"]["pids"].as_u64().unwrap(),
        "the VM's processes stay inside the guest: {pids_now}"
    );

    // Disk: writing past the quota is an I/O error in the guest; the host file stays under it.
    // Written straight to the block device (direct I/O, far from the filesystem's data): how
    // ext4 reacts to the error (it aborts its journal, and an fsync may then hang forever) is
    // the guest's business; what the device answers is ours.
    let (code, out, err) = d
        .exec(
            &hog_id,
            &["sh", "-c", "dd if=/dev/zero of=/dev/vda bs=1M seek=3000 count=400 oflag=direct 2>&1; echo dd=$?"],
        )
        .await;
    let text = format!("{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("dd=0"), "writing 400 MiB past a 160 MiB quota succeeded: {text}");
    assert!(text.contains("Input/output error"), "the guest must see an I/O error: {text}");
    let layer = std::fs::metadata(d.sandbox_dir(&hog_id).join("disk.qcow2")).unwrap().len();
    assert!(layer <= 160 << 20, "the disk layer grew to {layer} bytes, past its 160 MiB quota");

    // The console is the guest's too: 16 MiB written to it keep at most 1 MiB on the host, and
    // everything the sandbox holds stays within its disk quota, its RAM and that.
    let (code, out, err) = d
        .exec(
            &hog_id,
            &["sh", "-c", "head -c 16M /dev/zero | tr '\\0' x > /dev/ttyS0; echo; echo console-end > /dev/ttyS0"],
        )
        .await;
    assert_eq!(code, Some(0), "{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    let dir = d.sandbox_dir(&hog_id);
    common::wait_for("the console's last line", Duration::from_secs(120), || {
        std::fs::read_to_string(dir.join("console.log")).is_ok_and(|t| t.contains("console-end"))
    })
    .await;
    let console: u64 = ["console.log", "console.log.1"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(console <= 1 << 20, "16 MiB on the console kept {console} bytes on the host");
    let held = allocated_bytes(&dir);
    let quota = (160u64 << 20) + (hog["memory_mib"].as_u64().unwrap() << 20) + (1 << 20) + (1 << 20);
    assert!(held <= quota, "the sandbox holds {held} bytes on disk, past {quota}");
    let (code, _, _) = d.exec(witness["id"].as_str().unwrap(), &["true"]).await;
    assert_eq!(code, Some(0));

    for sb in [&hog, &bomb, &witness] {
        let id = sb["id"].as_str().unwrap();
        let (status, _) = d.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        common::assert_nothing_left(&d, id, false);
    }
}

#[tokio::test]
async fn failed_authentications_are_rate_limited_but_never_lock_the_key_out() {
    let d = Daemon::start().await;
    let client = reqwest::Client::new();
    for i in 0..10 {
        let resp =
            client.get(format!("{}/v1/sandboxes", d.url)).bearer_auth(format!("wrong-{i}")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let resp = client.get(format!("{}/v1/sandboxes", d.url)).bearer_auth("wrong-again").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("refused for"), "{body}");
    // Nobody can lock the operator out by failing on purpose: the right key, from the very same
    // address, still works.
    let (status, _) = d.call(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(status, StatusCode::OK);
    // Unauthenticated routes are unaffected.
    assert!(client.get(format!("{}/v1/health", d.url)).send().await.unwrap().status().is_success());
}

#[test]
fn a_non_loopback_listen_address_is_refused_without_the_explicit_flag() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config.toml");
    std::fs::write(&config, format!("data_dir = \"{}\"\nlisten = \"0.0.0.0:17999\"\n", home.path().display())).unwrap();
    let out = Command::new(common::TORPOR).args(["server", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success(), "the server started on 0.0.0.0 without allow_insecure_listen");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("allow_insecure_listen"), "the error must say how: {err}");
    std::fs::write(&config, format!("data_dir = \"{}\"\nlisten = \"127.0.0.1:17999\"\n", home.path().display()))
        .unwrap();
    let out = Command::new(common::TORPOR)
        .args(["server", "--listen", "0.0.0.0:17999", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("allow_insecure_listen"));
}

/// Allocated bytes of every file under `dir`, subdirectories included.
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                allocated_bytes(&e.path())
            } else {
                meta.blocks() * 512
            }
        })
        .sum()
}
