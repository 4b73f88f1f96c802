//! The sandbox's agent. A message for a conversation goes to the agent program through an
//! adapter, which turns the program's output into events: text as it is written, tool activity,
//! and the end of the run. Each conversation's state (the agent's own session id and how many
//! messages it has handled) lives in a file in the guest, so it survives pause/resume with
//! everything else, and messages of one conversation run one at a time, in arrival order.
//!
//! Adapters:
//! - `echo` answers `echo: <text>` (for tests and for trying the relay);
//! - `command` runs any program that reads one JSON line and writes JSON lines (see below);
//! - `claude-code` runs the Claude Code CLI non-interactively in stream-JSON mode, resuming its
//!   session so the conversation continues;
//! - `codex` runs `codex exec --json`, resuming its thread likewise.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, RwLock};
use tonic::{Request, Response, Status};
use torpor_proto::supervisor::agent_server::Agent;
use torpor_proto::supervisor::*;

use crate::reaper::Reaper;

const STATE_DIR: &str = "/var/lib/torpor/agent";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How much of a tool call's detail an event carries.
const DETAIL_CHARS: usize = 200;

/// What a conversation remembers between messages.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct State {
    conversation: String,
    session: String,
    turns: u64,
}

#[derive(Default)]
struct Conversation {
    /// Held for the whole run of one message.
    turn: tokio::sync::Mutex<()>,
    /// Process group of the run in progress.
    running: Mutex<Option<i32>>,
}

pub struct Agents {
    reaper: Reaper,
    default_env: Arc<RwLock<HashMap<String, String>>>,
    conversations: Mutex<HashMap<String, Arc<Conversation>>>,
    dir: PathBuf,
}

pub type EventStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<AgentEvent, Status>> + Send>>;

fn event(kind: agent_event::Kind) -> Result<AgentEvent, Status> {
    Ok(AgentEvent { kind: Some(kind) })
}

fn shorten(s: &str) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= DETAIL_CHARS {
        one_line
    } else {
        one_line.chars().take(DETAIL_CHARS).collect::<String>() + "…"
    }
}

impl Agents {
    pub fn new(reaper: Reaper, default_env: Arc<RwLock<HashMap<String, String>>>) -> Arc<Self> {
        Arc::new(Self { reaper, default_env, conversations: Mutex::new(HashMap::new()), dir: STATE_DIR.into() })
    }

    fn conversation(&self, key: &str) -> Arc<Conversation> {
        self.conversations.lock().expect("agent table poisoned").entry(key.to_owned()).or_default().clone()
    }

    fn state_path(&self, conversation: &str) -> PathBuf {
        // Any string names a conversation; its file name is a digest of it.
        let digest = <sha2::Sha256 as sha2::Digest>::digest(conversation.as_bytes());
        self.dir.join(format!("{}.json", hex::encode(&digest[..16])))
    }

    fn load(&self, conversation: &str) -> State {
        std::fs::read(self.state_path(conversation))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| State { conversation: conversation.to_owned(), ..Default::default() })
    }

    /// Written to a temporary file, synced and renamed: a crash leaves the old state or the new.
    fn save(&self, state: &State) -> std::io::Result<()> {
        use std::io::Write;
        std::fs::create_dir_all(&self.dir)?;
        let path = self.state_path(&state.conversation);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(state).expect("state serialises"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    pub fn deliver(self: &Arc<Self>, req: DeliverRequest) -> Result<EventStream, Status> {
        let spec = req.agent.unwrap_or_default();
        if !["echo", "command", "claude-code", "codex"].contains(&spec.adapter.as_str()) {
            return Err(Status::invalid_argument(format!(
                "unknown agent adapter {:?}: echo, command, claude-code or codex",
                spec.adapter
            )));
        }
        if spec.adapter == "command" && spec.command.is_empty() {
            return Err(Status::invalid_argument("the command adapter needs a command"));
        }
        if req.conversation.is_empty() {
            return Err(Status::invalid_argument("a message needs a conversation"));
        }
        let (tx, rx) = mpsc::channel(64);
        let agents = self.clone();
        tokio::spawn(async move {
            let conversation = agents.conversation(&req.conversation);
            let _turn = conversation.turn.lock().await;
            let mut state = agents.load(&req.conversation);
            let outcome = match spec.adapter.as_str() {
                "echo" => Ok(Outcome { text: format!("echo: {}", req.text), session: echo_session(&state) }),
                adapter => agents.run(adapter, &spec, &state, &req.text, &conversation, &tx).await,
            };
            match outcome {
                Ok(outcome) => {
                    if !outcome.session.is_empty() {
                        state.session = outcome.session;
                    }
                    state.turns += 1;
                    if let Err(e) = agents.save(&state) {
                        let message = format!("saving the conversation: {e}");
                        let _ = tx.send(event(agent_event::Kind::Error(AgentError { message }))).await;
                        return;
                    }
                    if spec.adapter == "echo" {
                        let _ = tx.send(event(agent_event::Kind::Text(TextDelta { text: outcome.text.clone() }))).await;
                    }
                    let done = AgentDone { text: outcome.text, session: state.session.clone(), turn: state.turns };
                    let _ = tx.send(event(agent_event::Kind::Done(done))).await;
                }
                Err(message) => {
                    let _ = tx.send(event(agent_event::Kind::Error(AgentError { message }))).await;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    pub fn cancel(&self, conversation: &str) -> bool {
        let pgid = self.conversations.lock().expect("agent table poisoned").get(conversation).and_then(|c| {
            let running = c.running.lock().expect("agent run poisoned");
            *running
        });
        match pgid {
            Some(pgid) => {
                let cancelled = killpg(Pid::from_raw(pgid), Signal::SIGTERM).is_ok();
                // What ignores SIGTERM gets SIGKILL a little later.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                });
                cancelled
            }
            None => false,
        }
    }

    pub fn status(&self) -> Vec<ConversationStatus> {
        let busy: HashMap<String, bool> = self
            .conversations
            .lock()
            .expect("agent table poisoned")
            .iter()
            .map(|(k, c)| (k.clone(), c.turn.try_lock().is_err()))
            .collect();
        let mut states: HashMap<String, State> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| serde_json::from_slice::<State>(&std::fs::read(e.path()).ok()?).ok())
            .map(|s| (s.conversation.clone(), s))
            .collect();
        // A conversation whose first message is still being answered has no file yet.
        for conversation in busy.keys() {
            states
                .entry(conversation.clone())
                .or_insert_with(|| State { conversation: conversation.clone(), ..Default::default() });
        }
        let mut out: Vec<ConversationStatus> = states
            .into_values()
            .map(|s| ConversationStatus {
                busy: busy.get(&s.conversation).copied().unwrap_or(false),
                conversation: s.conversation,
                session: s.session,
                turns: s.turns,
            })
            .collect();
        out.sort_by(|a, b| a.conversation.cmp(&b.conversation));
        out
    }

    /// Runs one message through a program-backed adapter, forwarding its events to `tx`.
    async fn run(
        &self,
        adapter: &str,
        spec: &AgentSpec,
        state: &State,
        text: &str,
        conversation: &Conversation,
        tx: &mpsc::Sender<Result<AgentEvent, Status>>,
    ) -> Result<Outcome, String> {
        let (argv, stdin_text) = invocation(adapter, spec, state, text);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .envs(self.default_env.read().await.iter())
            .envs(&spec.env)
            .env("TORPOR_CONVERSATION", &state.conversation)
            .env("TORPOR_SESSION", &state.session)
            .env("TORPOR_TURN", (state.turns + 1).to_string())
            .current_dir(if spec.cwd.is_empty() { "/root" } else { &spec.cwd })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        if adapter == "claude-code" {
            // Claude Code refuses to skip permission prompts as root outside a sandbox; this is one.
            cmd.env("IS_SANDBOX", "1");
        }
        let (mut child, exit) =
            self.reaper.spawn(&mut cmd).map_err(|e| format!("cannot start the agent {:?}: {e}", argv[0]))?;
        let pgid = child.id() as i32;
        *conversation.running.lock().expect("agent run poisoned") = Some(pgid);
        let result = follow(&mut child, exit, pgid, stdin_text, adapter, state, tx).await;
        *conversation.running.lock().expect("agent run poisoned") = None;
        let (status, parse, stderr) = result?;
        if let Some(message) = parse.error {
            return Err(message);
        }
        if !status.success() {
            let stderr = String::from_utf8_lossy(&stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!("the agent {} ({status}): {}", argv[0], tail.join(" / ")));
        }
        let text = parse.final_text.unwrap_or(parse.text);
        Ok(Outcome { text, session: parse.session })
    }
}

/// After the agent exits, how long output of processes it left behind may still flow.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How much of the end of the agent's standard error is kept for an error message.
const STDERR_TAIL: usize = 8 * 1024;

/// Feeds the agent its input, turns its output into events until it exits, and returns its
/// exit status, what was parsed and the end of its standard error. Processes it left behind
/// holding its output open are killed after `DRAIN_AFTER_EXIT`, so a run always ends.
async fn follow(
    child: &mut std::process::Child,
    exit: tokio::sync::oneshot::Receiver<std::process::ExitStatus>,
    pgid: i32,
    stdin_text: String,
    adapter: &str,
    state: &State,
    tx: &mpsc::Sender<Result<AgentEvent, Status>>,
) -> Result<(std::process::ExitStatus, Parse, Vec<u8>), String> {
    let io_err = |e: std::io::Error| format!("agent output: {e}");
    let stdin = tokio::process::ChildStdin::from_std(child.stdin.take().expect("piped")).map_err(io_err)?;
    let stdout = tokio::process::ChildStdout::from_std(child.stdout.take().expect("piped")).map_err(io_err)?;
    let stderr = tokio::process::ChildStderr::from_std(child.stderr.take().expect("piped")).map_err(io_err)?;
    // Written beside the readers: a program that writes before it reads cannot block us.
    tokio::spawn(async move {
        let mut stdin = stdin;
        let _ = stdin.write_all(stdin_text.as_bytes()).await;
    });
    let errors = tokio::spawn(async move {
        let (mut stderr, mut tail, mut buf) = (stderr, Vec::new(), [0u8; 4096]);
        while let Ok(n @ 1..) = stderr.read(&mut buf).await {
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
        }
        tail
    });
    let mut parse = Parse { adapter: adapter.to_owned(), session: state.session.clone(), ..Default::default() };
    let mut lines = BufReader::new(stdout).lines();
    let mut closed = false;
    tokio::pin!(exit);
    let mut status = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let mut drain_until = far;
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line,
            done = &mut exit, if status.is_none() => {
                status = Some(done.map_err(|_| "lost the agent's exit status".to_owned())?);
                drain_until = tokio::time::Instant::now() + DRAIN_AFTER_EXIT;
                continue;
            }
            _ = tokio::time::sleep_until(drain_until) => {
                // Its output is held open by something it started: end that too.
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                break;
            }
        };
        match line {
            Ok(Some(line)) => {
                for kind in parse.line(&line) {
                    // A caller that went away does not stop the run: the conversation advances.
                    if !closed && tx.send(event(kind)).await.is_err() {
                        closed = true;
                    }
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    let status = match status {
        Some(status) => status,
        None => exit.await.map_err(|_| "lost the agent's exit status".to_owned())?,
    };
    let stderr = match tokio::time::timeout(DRAIN_AFTER_EXIT, errors).await {
        Ok(Ok(tail)) => tail,
        _ => {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            Vec::new()
        }
    };
    Ok((status, parse, stderr))
}

struct Outcome {
    text: String,
    session: String,
}

fn echo_session(state: &State) -> String {
    if state.session.is_empty() {
        format!("echo-{:016x}", rand::random::<u64>())
    } else {
        state.session.clone()
    }
}

/// The program to run and what to write to its standard input.
fn invocation(adapter: &str, spec: &AgentSpec, state: &State, text: &str) -> (Vec<String>, String) {
    let program = |default: &str| spec.command.first().cloned().unwrap_or_else(|| default.to_owned());
    match adapter {
        "claude-code" => {
            // The prompt goes on standard input: text starting with `-` cannot pass for an
            // option, and no length limit of the command line applies.
            let mut argv = vec![
                program("claude"),
                "-p".into(),
                "--output-format".into(),
                "stream-json".into(),
                "--verbose".into(),
                "--include-partial-messages".into(),
                "--dangerously-skip-permissions".into(),
            ];
            if !state.session.is_empty() {
                argv.extend(["--resume".into(), state.session.clone()]);
            }
            (argv, text.to_owned())
        }
        "codex" => {
            let mut argv = vec![
                program("codex"),
                "exec".into(),
                "--json".into(),
                "--skip-git-repo-check".into(),
                "--dangerously-bypass-approvals-and-sandbox".into(),
            ];
            if !state.session.is_empty() {
                argv.extend(["resume".into(), state.session.clone()]);
            }
            // `-`: the prompt is read from standard input.
            argv.push("-".into());
            (argv, text.to_owned())
        }
        _ => {
            let line = json!({
                "conversation": state.conversation, "session": state.session, "turn": state.turns + 1, "text": text,
            });
            (spec.command.clone(), format!("{line}\n"))
        }
    }
}

/// Turns an agent program's output lines into events.
#[derive(Default)]
struct Parse {
    adapter: String,
    session: String,
    /// Text streamed so far.
    text: String,
    /// The whole reply, when the program states it at the end.
    final_text: Option<String>,
    error: Option<String>,
    /// Claude Code sent partial messages: its whole messages repeat them and are skipped.
    partials: bool,
}

impl Parse {
    fn line(&mut self, line: &str) -> Vec<agent_event::Kind> {
        let parsed: Option<Value> = serde_json::from_str(line.trim()).ok().filter(Value::is_object);
        match (self.adapter.as_str(), parsed) {
            ("claude-code", Some(v)) => self.claude(&v),
            ("codex", Some(v)) => self.codex(&v),
            ("command", Some(v)) => self.command(&v),
            // Anything that is not a JSON object is plain output.
            (_, _) if line.trim().is_empty() => Vec::new(),
            (_, _) => self.text(format!("{line}\n")),
        }
    }

    fn text(&mut self, text: String) -> Vec<agent_event::Kind> {
        self.text.push_str(&text);
        vec![agent_event::Kind::Text(TextDelta { text })]
    }

    fn command(&mut self, v: &Value) -> Vec<agent_event::Kind> {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        match v["type"].as_str() {
            Some("text") => self.text(s("text")),
            Some("tool") => {
                vec![agent_event::Kind::Tool(ToolActivity { name: s("name"), detail: shorten(&s("detail")) })]
            }
            Some("done") => {
                if let Some(session) = v["session"].as_str() {
                    self.session = session.to_owned();
                }
                self.final_text = v["text"].as_str().map(str::to_owned);
                Vec::new()
            }
            Some("error") => {
                self.error = Some(s("message"));
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn claude(&mut self, v: &Value) -> Vec<agent_event::Kind> {
        match v["type"].as_str() {
            Some("system") => {
                if let Some(id) = v["session_id"].as_str() {
                    self.session = id.to_owned();
                }
                Vec::new()
            }
            Some("stream_event") => {
                let ev = &v["event"];
                match (ev["type"].as_str(), ev["delta"]["type"].as_str()) {
                    (Some("content_block_delta"), Some("text_delta")) => {
                        self.partials = true;
                        self.text(ev["delta"]["text"].as_str().unwrap_or_default().to_owned())
                    }
                    _ => Vec::new(),
                }
            }
            Some("assistant") => {
                let mut out = Vec::new();
                for block in v["message"]["content"].as_array().into_iter().flatten() {
                    match block["type"].as_str() {
                        Some("tool_use") => out.push(agent_event::Kind::Tool(ToolActivity {
                            name: block["name"].as_str().unwrap_or("tool").to_owned(),
                            detail: shorten(&block["input"].to_string()),
                        })),
                        Some("text") if !self.partials => {
                            out.extend(self.text(block["text"].as_str().unwrap_or_default().to_owned()))
                        }
                        _ => {}
                    }
                }
                out
            }
            Some("result") => {
                if let Some(id) = v["session_id"].as_str() {
                    self.session = id.to_owned();
                }
                let result = v["result"].as_str().unwrap_or_default().to_owned();
                if v["is_error"].as_bool() == Some(true) || v["subtype"].as_str().is_some_and(|s| s != "success") {
                    self.error = Some(if result.is_empty() { "Claude Code reported an error".into() } else { result });
                } else {
                    self.final_text = Some(result);
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn codex(&mut self, v: &Value) -> Vec<agent_event::Kind> {
        let item = &v["item"];
        match (v["type"].as_str(), item["type"].as_str()) {
            (Some("thread.started"), _) => {
                if let Some(id) = v["thread_id"].as_str() {
                    self.session = id.to_owned();
                }
                Vec::new()
            }
            (Some("item.started"), Some("command_execution")) => vec![agent_event::Kind::Tool(ToolActivity {
                name: "command".into(),
                detail: shorten(item["command"].as_str().unwrap_or_default()),
            })],
            (Some("item.completed"), Some("file_change")) => vec![agent_event::Kind::Tool(ToolActivity {
                name: "file_change".into(),
                detail: shorten(&item["changes"].to_string()),
            })],
            (Some("item.completed"), Some("agent_message")) => {
                let sep = if self.text.is_empty() { "" } else { "\n\n" };
                self.text(format!("{sep}{}", item["text"].as_str().unwrap_or_default()))
            }
            (Some("turn.failed") | Some("error"), _) => {
                let message = v["error"]["message"].as_str().or(v["message"].as_str()).unwrap_or("Codex failed");
                self.error = Some(message.to_owned());
                Vec::new()
            }
            _ => Vec::new(),
        }
    }
}

/// The gRPC face of [`Agents`].
pub struct AgentService(pub Arc<Agents>);

#[tonic::async_trait]
impl Agent for AgentService {
    type DeliverStream = EventStream;

    async fn deliver(&self, req: Request<DeliverRequest>) -> Result<Response<Self::DeliverStream>, Status> {
        Ok(Response::new(self.0.deliver(req.into_inner())?))
    }

    async fn cancel(&self, req: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        Ok(Response::new(CancelResponse { cancelled: self.0.cancel(&req.into_inner().conversation) }))
    }

    async fn status(&self, _: Request<AgentStatusRequest>) -> Result<Response<AgentStatusResponse>, Status> {
        Ok(Response::new(AgentStatusResponse { conversations: self.0.status() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(kinds: &[agent_event::Kind]) -> String {
        kinds
            .iter()
            .filter_map(|k| match k {
                agent_event::Kind::Text(t) => Some(t.text.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn claude_code_stream_json() {
        let mut p = Parse { adapter: "claude-code".into(), ..Default::default() };
        let lines = [
            r#"{"type":"system","subtype":"init","session_id":"s-1","tools":[]}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"lo"}}}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"Hello"},{"type":"tool_use","name":"Bash","input":{"command":"ls"}}]}}"#,
            r#"{"type":"result","subtype":"success","is_error":false,"result":"Hello","session_id":"s-1"}"#,
        ];
        let events: Vec<_> = lines.iter().flat_map(|l| p.line(l)).collect();
        assert_eq!(texts(&events), "Hello", "partials, not the whole message again");
        assert!(events.iter().any(|e| matches!(e, agent_event::Kind::Tool(t) if t.name == "Bash")));
        assert_eq!((p.session.as_str(), p.final_text.as_deref()), ("s-1", Some("Hello")));
        let mut failed = Parse { adapter: "claude-code".into(), ..Default::default() };
        failed.line(r#"{"type":"result","subtype":"error_max_turns","is_error":true,"result":""}"#);
        assert!(failed.error.is_some());
    }

    #[test]
    fn codex_exec_json() {
        let mut p = Parse { adapter: "codex".into(), ..Default::default() };
        let lines = [
            r#"{"type":"thread.started","thread_id":"th-9"}"#,
            r#"{"type":"turn.started"}"#,
            r#"{"type":"item.started","item":{"id":"i1","type":"command_execution","command":"bash -lc ls","status":"in_progress"}}"#,
            r#"{"type":"item.completed","item":{"id":"i2","type":"agent_message","text":"Done."}}"#,
            r#"{"type":"turn.completed","usage":{"input_tokens":10,"cached_input_tokens":0,"output_tokens":3}}"#,
        ];
        let events: Vec<_> = lines.iter().flat_map(|l| p.line(l)).collect();
        assert_eq!(texts(&events), "Done.");
        assert!(events.iter().any(|e| matches!(e, agent_event::Kind::Tool(t) if t.detail == "bash -lc ls")));
        assert_eq!(p.session, "th-9");
        let mut failed = Parse { adapter: "codex".into(), ..Default::default() };
        failed.line(r#"{"type":"turn.failed","error":{"message":"quota"}}"#);
        assert_eq!(failed.error.as_deref(), Some("quota"));
    }

    #[test]
    fn command_lines_and_plain_output() {
        let mut p = Parse { adapter: "command".into(), ..Default::default() };
        let events: Vec<_> = [
            r#"{"type":"text","text":"a"}"#,
            "not json",
            r#"{"type":"tool","name":"grep","detail":"x"}"#,
            r#"{"type":"done","session":"abc"}"#,
        ]
        .iter()
        .flat_map(|l| p.line(l))
        .collect();
        assert_eq!(texts(&events), "anot json\n");
        assert_eq!(p.session, "abc");
        assert_eq!(p.final_text, None);
    }
}
