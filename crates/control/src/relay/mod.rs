//! The relay: a message arrives on a channel (HTTP, Telegram, Slack) → the conversation's
//! sandbox is found (or created from the channel's template) → resumed if paused → the message
//! goes to its agent → the reply streams back the way the message came. Messages of one
//! conversation queue and are delivered one at a time, in the order they arrived, so a burst
//! that lands while the sandbox wakes is answered in order. Delivery keys (Telegram
//! `update_id`, Slack `event_id`, HTTP idempotency keys) are remembered, so a redelivered
//! message is answered once. A Telegram or Slack message is stored before it is acknowledged
//! and until it is answered: a daemon stopped in between delivers it again when it starts (at
//! least once). After the reply the sandbox's normal idle timeout applies.

mod slack;
mod telegram;
mod waiting;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use torpor_proto::supervisor::{agent_event, AgentSpec, DeliverRequest};

pub use slack::verify_slack_signature;

use crate::error::ApiError;
use crate::manager::Manager;
use torpor_api::{AgentConfig, Channel, CreateSandbox, RelayEvent, State};
use waiting::Waiting;

/// Where a reply goes.
pub enum Reply {
    Http(mpsc::Sender<RelayEvent>),
    Telegram { chat_id: i64, reply_to: i64 },
    Slack { channel: String, thread_ts: String },
}

/// A message as stored until it is answered (an HTTP client cannot be answered after a restart,
/// so its messages are not stored).
#[derive(Serialize, Deserialize)]
struct StoredJob {
    conversation: String,
    text: String,
    telegram: Option<(i64, i64)>,
    slack: Option<(String, String)>,
}

struct Job {
    channel: Channel,
    conversation: String,
    text: String,
    reply: Reply,
    /// The delivery key, to mark the message answered.
    key: Option<String>,
}

pub struct Relay {
    manager: Arc<Manager>,
    http: reqwest::Client,
    queues: Mutex<HashMap<(String, String), mpsc::UnboundedSender<Job>>>,
    /// Messages taken and not yet answered.
    waiting: Mutex<Waiting>,
    /// Per channel: held while a conversation's sandbox is counted, created and bound, so
    /// first messages arriving together cannot all pass the channel's conversation cap.
    new_conversations: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// An agent's answer: text past this is dropped and the answer ends with an error.
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Times a stored message is taken up again after restarts before it is given up on (its
/// answer may be what ends the daemon).
const MAX_RECOVERIES: u32 = 3;

/// An HTTP client that reads nothing for this long is dropped: it must not stall the
/// conversation's queue.
const HTTP_CLIENT_STALL: Duration = Duration::from_secs(30);

/// Whether a message was taken or had been seen before.
#[derive(Debug, PartialEq, Eq)]
pub enum Submitted {
    Queued,
    Duplicate,
}

impl Relay {
    pub fn new(manager: Arc<Manager>) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("torpor-relay/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .build()
            .expect("the relay's HTTP client builds");
        Arc::new(Self {
            manager,
            http,
            queues: Mutex::new(HashMap::new()),
            waiting: Default::default(),
            new_conversations: Default::default(),
        })
    }

    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// The channel is gone: so is what the relay kept for it (its queues retire when idle).
    pub fn forget_channel(&self, name: &str) {
        self.new_conversations.lock().expect("relay locks poisoned").remove(name);
    }

    /// Queues a message behind the conversation's earlier ones; `key` de-duplicates.
    pub async fn submit(
        self: &Arc<Self>,
        channel: &Channel,
        conversation: &str,
        key: Option<&str>,
        text: String,
        reply: Reply,
    ) -> Result<Submitted, ApiError> {
        let name = channel.spec.name.as_str();
        // Counted at once, so messages arriving together cannot all pass the caps; given back if
        // the message is not queued after all.
        {
            let mut waiting = self.waiting.lock().expect("relay counts poisoned");
            if let Some(full) = waiting.full(name, conversation) {
                return Err(ApiError::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    format!("{full}; try again later"),
                ));
            }
            waiting.add(name, conversation);
        }
        let not_queued = || self.waiting.lock().expect("relay counts poisoned").remove(name, conversation);
        if let Some(key) = key {
            let (telegram, slack) = match &reply {
                Reply::Http(_) => (None, None),
                Reply::Telegram { chat_id, reply_to } => (Some((*chat_id, *reply_to)), None),
                Reply::Slack { channel, thread_ts } => (None, Some((channel.clone(), thread_ts.clone()))),
            };
            let storable = telegram.is_some() || slack.is_some();
            let stored = storable.then(|| StoredJob {
                conversation: conversation.to_owned(),
                text: text.clone(),
                telegram,
                slack,
            });
            let stored = stored.map(|s| serde_json::to_string(&s).expect("jobs serialise"));
            match self.manager.store().first_delivery(name, key, stored.as_deref()).await {
                Ok(true) => {}
                Ok(false) => {
                    not_queued();
                    tracing::info!(channel = %name, %key, "duplicate delivery ignored");
                    return Ok(Submitted::Duplicate);
                }
                Err(e) => {
                    not_queued();
                    return Err(e.into());
                }
            }
        }
        let job = Job {
            channel: channel.clone(),
            conversation: conversation.to_owned(),
            text,
            reply,
            key: key.map(str::to_owned),
        };
        self.enqueue(job);
        Ok(Submitted::Queued)
    }

    /// Delivers again what a previous run of the daemon took but did not answer, in the order
    /// it arrived. Called once at start, after the sandboxes are reconciled.
    pub async fn recover(self: &Arc<Self>) -> Result<usize, ApiError> {
        let store = self.manager.store();
        let mut recovered = 0;
        for (name, key, stored, attempts) in store.pending_deliveries().await? {
            if attempts >= MAX_RECOVERIES {
                tracing::error!(channel = %name, %key, attempts, "a message taken up after {attempts} restarts is given up on");
                store.delivered(&name, &key).await?;
                continue;
            }
            let (Some(channel), Ok(job)) = (store.channel(&name).await?, serde_json::from_str::<StoredJob>(&stored))
            else {
                store.delivered(&name, &key).await?;
                continue;
            };
            let reply = match (job.telegram, job.slack) {
                (Some((chat_id, reply_to)), _) => Reply::Telegram { chat_id, reply_to },
                (None, Some((channel, thread_ts))) => Reply::Slack { channel, thread_ts },
                (None, None) => {
                    store.delivered(&name, &key).await?;
                    continue;
                }
            };
            tracing::info!(channel = %name, %key, "delivering a message taken before the daemon stopped");
            self.waiting.lock().expect("relay counts poisoned").add(&name, &job.conversation);
            self.enqueue(Job { channel, conversation: job.conversation, text: job.text, reply, key: Some(key) });
            recovered += 1;
        }
        Ok(recovered)
    }

    /// Behind the conversation's earlier messages.
    /// Callers have counted the job as waiting.
    fn enqueue(self: &Arc<Self>, job: Job) {
        let mut queues = self.queues.lock().expect("relay queues poisoned");
        let queue_key = (job.channel.spec.name.clone(), job.conversation.clone());
        // A queue whose worker has retired hands the job back.
        let job = match queues.get(&queue_key) {
            Some(queue) => match queue.send(job) {
                Ok(()) => return,
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(job);
        queues.insert(queue_key.clone(), tx);
        self.manager.background.spawn("relay-worker", self.clone().worker(queue_key, rx));
    }

    /// Delivers one conversation's messages in order; ends when its queue has been empty a while.
    async fn worker(self: Arc<Self>, key: (String, String), mut rx: mpsc::UnboundedReceiver<Job>) {
        loop {
            let job = match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some(job)) => job,
                Ok(None) => return,
                Err(_) => {
                    // Idle: retire, unless a message slipped in meanwhile.
                    let mut queues = self.queues.lock().expect("relay queues poisoned");
                    match rx.try_recv() {
                        Ok(job) => {
                            drop(queues);
                            self.handle(job).await;
                            continue;
                        }
                        Err(_) => {
                            queues.remove(&key);
                            return;
                        }
                    }
                }
            };
            self.handle(job).await;
        }
    }

    async fn handle(&self, job: Job) {
        self.answer(&job).await;
        self.waiting.lock().expect("relay counts poisoned").remove(&job.channel.spec.name, &job.conversation);
        // Answered, or given up on for good (no way to reply, or the reply kept failing):
        // either way, never delivered again.
        if let Some(key) = &job.key {
            if let Err(e) = self.manager.store().delivered(&job.channel.spec.name, key).await {
                tracing::warn!(channel = %job.channel.spec.name, %key, error = %e, "marking a message answered failed");
            }
        }
    }

    async fn answer(&self, job: &Job) {
        let name = job.channel.spec.name.clone();
        let mut sink = match &job.reply {
            Reply::Http(tx) => Sink::Http(tx.clone(), false),
            Reply::Telegram { chat_id, reply_to } => {
                match telegram::Sink::new(self, &job.channel, *chat_id, *reply_to) {
                    Ok(s) => Sink::Telegram(Box::new(s)),
                    Err(e) => {
                        return tracing::error!(channel = %name, error = %e, "cannot reply on Telegram; message dropped")
                    }
                }
            }
            Reply::Slack { channel, thread_ts } => match slack::Sink::new(self, &job.channel, channel, thread_ts) {
                Ok(s) => Sink::Slack(Box::new(s)),
                Err(e) => return tracing::error!(channel = %name, error = %e, "cannot reply on Slack; message dropped"),
            },
        };
        let started = Instant::now();
        if let Err(message) = self.run(job, &mut sink).await {
            tracing::warn!(channel = %name, conversation = %job.conversation, %message, "relayed message failed");
            sink.event(RelayEvent::Error { message }).await;
        }
        tracing::info!(channel = %name, ms = started.elapsed().as_millis() as u64, "relayed message answered");
    }

    async fn run(&self, job: &Job, sink: &mut Sink) -> Result<(), String> {
        let (sandbox, agent) = self.sandbox_for(job).await?;
        let was_paused = self.manager.get(&sandbox).await.map(|s| s.state == State::Paused).unwrap_or(false);
        if was_paused {
            sink.event(RelayEvent::Waking { sandbox: sandbox.clone() }).await;
        }
        let woke_at = Instant::now();
        let live =
            self.manager.running(&sandbox).await.map_err(|e| {
                format!("Sorry, the sandbox for this conversation could not be woken up: {}", e.message)
            })?;
        let wake_ms = woke_at.elapsed().as_millis() as u64;
        let _busy = live.busy();
        let request = DeliverRequest {
            agent: Some(AgentSpec {
                adapter: agent.adapter.clone(),
                command: agent.command.clone(),
                cwd: agent.cwd.clone().unwrap_or_default(),
                env: agent.env.clone().into_iter().collect(),
            }),
            conversation: format!("{}/{}", job.channel.spec.name, job.conversation),
            text: job.text.clone(),
        };
        let conversation = request.conversation.clone();
        let deadline = Duration::from_secs(self.manager.cfg.agent_timeout_secs);
        let answered = tokio::time::timeout(deadline, self.follow(&live, request, sink, &sandbox, was_paused, wake_ms));
        match answered.await {
            Ok(result) => result,
            Err(_) => {
                // The conversation's next message must not find this run still going.
                let cancel = torpor_proto::supervisor::CancelRequest { conversation };
                let _ = crate::guest::within(live.guest.agent().cancel(cancel)).await;
                Err(format!("the agent did not finish within {} s (agent_timeout_secs)", deadline.as_secs()))
            }
        }
    }

    /// Passes the agent's answer on as it comes, within `MAX_ANSWER_BYTES`.
    async fn follow(
        &self,
        live: &crate::manager::Live,
        request: DeliverRequest,
        sink: &mut Sink,
        sandbox: &str,
        was_paused: bool,
        wake_ms: u64,
    ) -> Result<(), String> {
        let mut stream = crate::guest::within(live.guest.agent().deliver(request))
            .await
            .map_err(|e| format!("the sandbox's agent refused the message: {}", e.message()))?
            .into_inner();
        let mut streamed = 0usize;
        loop {
            let event = stream.message().await.map_err(|e| format!("the agent's answer broke off: {}", e.message()))?;
            let Some(kind) = event.and_then(|e| e.kind) else {
                return Err("the agent ended without an answer".into());
            };
            streamed += match &kind {
                agent_event::Kind::Text(t) => t.text.len(),
                agent_event::Kind::Tool(t) => t.name.len() + t.detail.len(),
                // The whole answer again, once: bounded on its own below.
                agent_event::Kind::Done(_) | agent_event::Kind::Error(_) => 0,
            };
            if streamed > MAX_ANSWER_BYTES {
                return Err(format!("the agent's answer passed {} KiB; the rest was dropped", MAX_ANSWER_BYTES >> 10));
            }
            let event = match kind {
                agent_event::Kind::Text(t) => RelayEvent::Text { text: t.text },
                agent_event::Kind::Tool(t) => RelayEvent::Tool { name: t.name, detail: t.detail },
                agent_event::Kind::Error(e) => {
                    return Err(format!("the agent failed: {}", torpor_engine::logs::cut(&e.message, 4 << 10)))
                }
                agent_event::Kind::Done(mut d) => {
                    d.text.truncate(torpor_engine::logs::cut(&d.text, MAX_ANSWER_BYTES).len());
                    let done = RelayEvent::Done {
                        text: d.text,
                        session: d.session,
                        turn: d.turn,
                        sandbox: sandbox.to_owned(),
                        woke: was_paused,
                        wake_ms,
                    };
                    sink.event(done).await;
                    return Ok(());
                }
            };
            sink.event(event).await;
        }
    }

    /// The conversation's sandbox, made from the channel's template on its first message (or
    /// again if the one it had was removed), and the agent to use in it.
    async fn sandbox_for(&self, job: &Job) -> Result<(String, AgentConfig), String> {
        let spec = &job.channel.spec;
        let store = self.manager.store();
        let bound = match &spec.sandbox {
            Some(id) => Some(id.clone()),
            None => store.binding(&spec.name, &job.conversation).await.map_err(|e| e.to_string())?,
        };
        let existing = match bound {
            Some(id) => match self.manager.get(&id).await {
                Ok(sandbox) => Some(sandbox),
                Err(_) if spec.sandbox.is_some() => return Err(format!("the channel's sandbox {id} no longer exists")),
                Err(_) => None,
            },
            None => None,
        };
        let sandbox = match existing {
            Some(sandbox) => sandbox,
            None => {
                let lock = self
                    .new_conversations
                    .lock()
                    .expect("relay locks poisoned")
                    .entry(spec.name.clone())
                    .or_default()
                    .clone();
                let _one_at_a_time = lock.lock().await;
                let cap = spec.max_conversations.unwrap_or(torpor_api::DEFAULT_MAX_CONVERSATIONS);
                if store.conversations(&spec.name).await.map_err(|e| e.to_string())? >= u64::from(cap) {
                    return Err(format!(
                        "Sorry, this channel already has its {cap} conversations; no new one can start"
                    ));
                }
                let req = CreateSandbox {
                    template: spec.template.clone(),
                    idle_timeout_secs: spec.idle_timeout_secs,
                    ..Default::default()
                };
                let req = crate::model::validate_create(req, &self.manager.cfg).map_err(|e| e.message)?;
                let sandbox =
                    self.manager.create(req).await.map_err(|e| {
                        format!("Sorry, no sandbox could be started for this conversation: {}", e.message)
                    })?;
                store.bind(&spec.name, &job.conversation, &sandbox.id).await.map_err(|e| e.to_string())?;
                tracing::info!(channel = %spec.name, conversation = %job.conversation, sandbox = %sandbox.id, "new conversation");
                sandbox
            }
        };
        let agent = sandbox.agent.clone().or_else(|| spec.agent.clone()).ok_or_else(|| {
            format!("sandbox {} has no agent: give its template an [agent], or the channel an agent", sandbox.id)
        })?;
        Ok((sandbox.id, agent))
    }
}

/// Where one message's reply events go.
enum Sink {
    /// The client, and whether it stopped reading.
    Http(mpsc::Sender<RelayEvent>, bool),
    Telegram(Box<telegram::Sink>),
    Slack(Box<slack::Sink>),
}

impl Sink {
    async fn event(&mut self, event: RelayEvent) {
        match self {
            // A client that went away, or stopped reading, stops receiving; the agent's run
            // still completes and the conversation's next message is not held up.
            Self::Http(tx, gone) => {
                if !*gone && tx.send_timeout(event, HTTP_CLIENT_STALL).await.is_err() {
                    *gone = true;
                }
            }
            Self::Telegram(s) => s.event(event).await,
            Self::Slack(s) => s.event(event).await,
        }
    }
}

/// Retries `call` on what a retry can fix (network, 429 after the time asked, 5xx) with
/// backoff: 0.5, 1, 2, 4 s; gives up after five attempts.
async fn with_retries<F, Fut, T>(what: &str, mut call: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Attempt>>,
{
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=5 {
        match call().await {
            Ok(v) => return Ok(v),
            Err(Attempt::Fatal(e)) => return Err(format!("{what}: {e}")),
            Err(Attempt::Retry { error, after }) => {
                if attempt == 5 {
                    return Err(format!("{what}: {error} (gave up after {attempt} attempts)"));
                }
                let wait = after.unwrap_or(delay).min(Duration::from_secs(30));
                tracing::warn!(%what, %error, wait_ms = wait.as_millis() as u64, "retrying");
                tokio::time::sleep(wait).await;
                delay *= 2;
            }
        }
    }
    unreachable!("the loop returns")
}

enum Attempt {
    Retry { error: String, after: Option<Duration> },
    Fatal(String),
}

impl Attempt {
    fn from_reqwest(e: reqwest::Error) -> Self {
        Self::Retry { error: e.to_string(), after: None }
    }
}
