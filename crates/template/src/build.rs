//! Building a template through the daemon's API: boot a build VM, add files, run the build
//! steps, start the processes, wait until they are ready, and capture the running VM.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use torpor_api::{CreateSandbox, CreateTemplate, ExecEvent, ExecRequest, Template};
use torpor_client::Client;

use crate::{Origin, ProcessSpec, TemplateFile};

/// What a build reports as it goes; the CLI draws a progress bar from it.
pub trait Progress {
    /// How many steps the build has.
    fn steps(&self, _total: u64) {}
    /// The step now running.
    fn step(&self, _what: &str) {}
    /// One more step is done.
    fn done(&self, _steps: u64) {}
}

/// Reports nothing.
pub struct Quiet;
impl Progress for Quiet {}

const CA_DIR: &str = "/usr/local/share/ca-certificates";
const CLEAN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Run in the build VM after the build steps, before the processes start: drops the page cache
/// and fills free memory with zeros once (the kernel zeroes each page a process touches first),
/// so the daemon can leave those pages out of the template's memory image. The filler is the
/// OOM killer's first choice and leaves 64 MiB free; if it dies anyway, the build goes on.
const COMPACT: &str = r#"sync && echo 3 > /proc/sys/vm/drop_caches || exit 1
command -v python3 >/dev/null || exit 0
python3 - <<'EOF'
import mmap
open("/proc/self/oom_score_adj", "w").write("1000")
free = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemFree:")) * 1024
chunk = 1 << 20
size = (max(0, free - (64 << 20)) // chunk) * chunk
if size:
    m = mmap.mmap(-1, size)
    zero = bytes(chunk)
    for offset in range(0, size, chunk):
        m[offset:offset + chunk] = zero
    m.close()
EOF
[ $? = 0 ] || echo "zeroing free memory stopped early; the template keeps more memory" >&2"#;

/// Builds template `name` from `origin` in a build VM of the daemon behind `client`; `ca_certs`
/// are PEM files the build VM and the template's sandboxes trust. On failure the build VM is
/// removed.
pub async fn build(
    client: &Client,
    name: &str,
    origin: &Origin,
    ca_certs: &[PathBuf],
    progress: &dyn Progress,
) -> Result<Template> {
    let spec = TemplateFile::parse(origin.text()).with_context(|| format!("in {}", origin.describe()))?;
    let mut cas = Vec::new();
    for path in ca_certs {
        let pem = std::fs::read(path).with_context(|| format!("reading CA certificate {}", path.display()))?;
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
            bail!("{} is not a PEM certificate (no BEGIN CERTIFICATE line)", path.display());
        }
        cas.push(pem);
    }
    progress.steps((3 + cas.len() + spec.files.len() + spec.run_steps().len() + spec.processes.len()) as u64);

    // The daemon checks the template's defaults now, not at the capture after a long build.
    client.check_template(&capture_request(name, "", &spec)).await.context("checking the template's defaults")?;
    progress.step("booting the build VM");
    let req = CreateSandbox {
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        env: spec.env.clone(),
        idle_timeout_secs: Some(0),
        cold_boot: true,
        network: Some(spec.build_policy()),
        ..Default::default()
    };
    let sandbox = client.create_sandbox(&req).await.context("creating the build VM")?;
    progress.done(1);
    let result = build_in(client, &sandbox.id, name, &spec, origin, &cas, progress).await;
    if result.is_err() {
        let _ = client.delete_sandbox(&sandbox.id).await;
    }
    result
}

async fn build_in(
    client: &Client,
    id: &str,
    name: &str,
    spec: &TemplateFile,
    origin: &Origin,
    cas: &[Vec<u8>],
    progress: &dyn Progress,
) -> Result<Template> {
    let put = |path: String, mode: String, data: Vec<u8>| async move {
        let req = client
            .request(reqwest::Method::PUT, &format!("/v1/sandboxes/{id}/files"))
            .query(&[("path", path.as_str()), ("mode", mode.as_str())])
            .body(data);
        client.send(req).await.with_context(|| format!("adding file {path}"))
    };
    for (i, pem) in cas.iter().enumerate() {
        progress.step("adding a CA certificate");
        put(format!("{CA_DIR}/torpor-build-{i}.crt"), "644".into(), pem.clone()).await?;
    }
    if !cas.is_empty() {
        exec_ok(client, id, "update-ca-certificates", "update-ca-certificates").await?;
        progress.done(cas.len() as u64);
    }
    for f in &spec.files {
        progress.step(&format!("adding {}", f.path));
        let data = match (&f.content, &f.source) {
            (Some(c), _) => c.clone().into_bytes(),
            (None, Some(src)) => origin.read(src).with_context(|| format!("file {}", f.path))?,
            (None, None) => unreachable!("checked when parsing"),
        };
        put(f.path.clone(), f.mode.clone().unwrap_or_else(|| "644".into()), data).await?;
        progress.done(1);
    }
    for r in &spec.run_steps() {
        progress.step(&format!("running: {}", r.command));
        let req = ExecRequest { timeout_secs: r.timeout_secs, ..shell(&r.command) };
        let (code, output) = exec(client, id, req).await?;
        if code != Some(0) {
            bail!("build command failed (exit {code:?}): {}\n--- output ---\n{}", r.command, output.trim_end());
        }
        progress.done(1);
    }
    // What the build left in the page cache would otherwise be in every clone's memory.
    progress.step("dropping the build's page cache and zeroing free memory");
    exec_ok(client, id, COMPACT, "compacting the build VM's memory").await?;
    progress.done(1);
    for p in &spec.processes {
        progress.step(&format!("starting {} and waiting until it is ready", p.name));
        start_process(client, id, p, &spec.env).await?;
        progress.done(1);
    }
    if !spec.preload.is_empty() {
        progress.step("reading the preload files into the page cache");
        let paths: Vec<String> = spec.preload.iter().map(|p| sh_quote(p)).collect();
        let script = format!("find {} -type f -exec cat {{}} + >/dev/null", paths.join(" "));
        exec_ok(client, id, &script, "preload").await?;
    }
    progress.step("snapshotting the running VM");
    let req = capture_request(name, id, spec);
    let t = client.create_template(&req).await.context("capturing the template")?;
    progress.done(1);
    Ok(t)
}

/// What `POST /v1/templates` (and `…/check`) gets for `spec`, capturing sandbox `id`.
fn capture_request(name: &str, id: &str, spec: &TemplateFile) -> CreateTemplate {
    CreateTemplate {
        name: name.to_owned(),
        sandbox: id.to_owned(),
        processes: std::iter::once("torpor-guest".to_owned())
            .chain(spec.processes.iter().map(|p| p.name.clone()))
            .collect(),
        network: spec.network.clone(),
        secrets: spec.secrets.clone(),
        github: spec.github.clone(),
        models: spec.models.clone(),
        agent: spec.agent.clone(),
    }
}

/// `value` as one shell word.
fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

/// Starts `p` in the background of sandbox `id` (detached, output to /var/log/torpor/NAME.log)
/// and waits until its ready check passes.
/// Its environment is the template's `env` and nothing else: a process that outlives the build
/// must not carry the build VM's credentials into every clone's memory.
pub async fn start_process(
    client: &Client,
    id: &str,
    p: &ProcessSpec,
    template_env: &BTreeMap<String, String>,
) -> Result<()> {
    let mut env = BTreeMap::new();
    env.insert("TORPOR_PROCESS_COMMAND".to_owned(), p.command.clone());
    let assignments: String = template_env.iter().map(|(k, v)| format!(" {k}={}", sh_quote(v))).collect();
    let start = ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            format!(
                "mkdir -p /var/log/torpor && env -i HOME=/root PATH={CLEAN_PATH} LANG=C.UTF-8{assignments} \
                 TORPOR_PROCESS_COMMAND=\"$TORPOR_PROCESS_COMMAND\" setsid sh -c \"$TORPOR_PROCESS_COMMAND\" \
                 >/var/log/torpor/{}.log 2>&1 </dev/null &",
                p.name
            ),
        ],
        env,
        cwd: p.cwd.clone(),
        ..Default::default()
    };
    let (code, output) = exec(client, id, start).await?;
    if code != Some(0) {
        bail!("starting process {} failed: {}\n{}", p.name, p.command, output.trim_end());
    }
    let timeout = Duration::from_secs(p.ready_timeout_secs.unwrap_or(60));
    let deadline = Instant::now() + timeout;
    loop {
        let (code, output) = exec(client, id, shell(&p.ready)).await?;
        if code == Some(0) {
            break;
        }
        if Instant::now() > deadline {
            let (_, log) = exec(client, id, shell(&format!("tail -n 20 /var/log/torpor/{}.log", p.name))).await?;
            bail!(
                "process {} was not ready within {} s: `{}` last said:\n{}\n--- its log ---\n{}",
                p.name,
                timeout.as_secs(),
                p.ready,
                output.trim_end(),
                log.trim_end()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Runs `argv` to completion; returns (exit code, combined output).
pub async fn exec(client: &Client, id: &str, req: ExecRequest) -> Result<(Option<i32>, String)> {
    let torpor_client::ExecOutput { stdout: out, stderr: err, exit } = client.exec(id, &req).await?;
    let code = match exit {
        ExecEvent::Exit { code, .. } => code,
        _ => None,
    };
    Ok((code, format!("{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err))))
}

/// Runs `script` (`sh -c`), which must exit 0; else fails saying `what` failed and its output.
async fn exec_ok(client: &Client, id: &str, script: &str, what: &str) -> Result<()> {
    let (code, output) = exec(client, id, shell(script)).await?;
    if code != Some(0) {
        bail!("{what} failed (exit {code:?}): {}", output.trim_end());
    }
    Ok(())
}

pub fn shell(command: &str) -> ExecRequest {
    ExecRequest { argv: vec!["sh".into(), "-c".into(), command.into()], ..Default::default() }
}
