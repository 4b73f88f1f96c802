//! The lifecycle in one table: which operation may start from which state, the state it holds
//! while it works, and where it ends. Every operation moves through the store's compare-and-set
//! (`Store::transition`), so two racing requests cannot both win, and refuses in one wording.
//!
//! ```text
//!            create ─► creating ──────────────► running ◄──── resuming ◄── resume ── paused
//!                          ▲                    │  │  └── pause ─► pausing ─────────►  ▲ │
//!   stopped/failed ─ start ┘          stop ─────┘  └─(VM dies)─► failed                │ │
//!        ▲                             ▼                                     stop ─────┘ │
//!        └──────────────────────── stopping ◄── delete (any settled state; the record goes)
//! ```

use torpor_api::State::{self, *};

use super::Manager;
use crate::error::ApiError;

/// An operation a caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::VariantArray)]
pub enum Op {
    Start,
    Pause,
    Resume,
    Stop,
    Delete,
}

/// What an operation may start from, holds while it works, and ends in.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub from: &'static [State],
    pub working: State,
    /// `None`: the sandbox is gone afterwards.
    pub done: Option<State>,
}

impl Op {
    pub const fn rule(self) -> Rule {
        match self {
            Op::Start => Rule { from: &[Stopped, Failed], working: Creating, done: Some(Running) },
            Op::Pause => Rule { from: &[Running], working: Pausing, done: Some(Paused) },
            Op::Resume => Rule { from: &[Paused], working: Resuming, done: Some(Running) },
            Op::Stop => Rule { from: &[Running, Paused], working: Stopping, done: Some(Stopped) },
            Op::Delete => Rule { from: &[Running, Paused, Stopped, Failed], working: Stopping, done: None },
        }
    }

    /// The 409 for a sandbox in a state this operation cannot start from.
    pub fn refusal(self, id: &str, state: State) -> ApiError {
        let (needs, done) = match self {
            Op::Start => ("a stopped or failed", "started"),
            Op::Pause => ("a running", "paused"),
            Op::Resume => ("a paused", "resumed"),
            Op::Stop => ("a running or paused", "stopped"),
            Op::Delete => return ApiError::conflict(format!("sandbox {id} is {state}; try again when it settles")),
        };
        ApiError::conflict(format!("sandbox {id} is {state}; only {needs} sandbox can be {done}"))
    }
}

/// The states a sandbox is in while its VM process should exist; a VM that dies unasked in one
/// of them leaves the sandbox failed.
pub const VM_EXPECTED: &[State] = &[Creating, Running, Pausing, Resuming];

/// The states no operation starts from: something is under way (or was, when a daemon died).
#[cfg(test)]
fn is_transient(state: State) -> bool {
    matches!(state, Creating | Pausing | Resuming | Stopping)
}

impl Manager {
    /// Moves sandbox `id` into `op`'s working state, or says why it cannot (404, or 409 with the
    /// state it is in).
    pub(super) async fn begin(&self, id: &str, op: Op) -> Result<(), ApiError> {
        let rule = op.rule();
        match self.store.transition(id, rule.from, rule.working, None).await? {
            Some(state) if rule.from.contains(&state) => Ok(()),
            Some(state) => Err(op.refusal(id, state)),
            None => Err(ApiError::not_found(format!("no sandbox {id:?}"))),
        }
    }

    /// Ends `op`: from its working state into the state it ends in.
    pub(super) async fn finish(&self, id: &str, op: Op) -> Result<(), ApiError> {
        let rule = op.rule();
        if let Some(done) = rule.done {
            self.store.transition(id, &[rule.working], done, None).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use strum::VariantArray;

    use super::*;
    use crate::store::Store;

    #[test]
    fn no_operation_starts_from_a_transient_state_and_each_ends_settled() {
        for op in Op::VARIANTS {
            let rule = op.rule();
            assert!(rule.from.iter().all(|s| !is_transient(*s)), "{op:?} starts from a transient state");
            assert!(is_transient(rule.working), "{op:?} works in a settled state");
            assert!(rule.done.is_none_or(|s| !is_transient(s)), "{op:?} ends in a transient state");
        }
        // Every transient state is some operation's working state, so each has an owner that
        // ends it (and reconcile knows what was under way).
        for state in State::VARIANTS.iter().filter(|s| is_transient(**s)) {
            assert!(Op::VARIANTS.iter().any(|op| op.rule().working == *state), "nobody works in {state}");
        }
        // A failed or stopped sandbox has no VM; a paused one has none either.
        for state in [Failed, Stopped, Paused] {
            assert!(!VM_EXPECTED.contains(&state));
        }
    }

    /// The lifecycle as documented (README, docs/architecture.md), written out apart from the
    /// table: a change to the table must change this too, on purpose.
    #[test]
    fn the_table_is_the_documented_lifecycle() {
        let allowed =
            |op: Op| -> Vec<State> { State::VARIANTS.iter().copied().filter(|s| op.rule().from.contains(s)).collect() };
        assert_eq!(allowed(Op::Pause), [Running]);
        assert_eq!(allowed(Op::Resume), [Paused]);
        assert_eq!(allowed(Op::Start), [Stopped, Failed]);
        assert_eq!(allowed(Op::Stop), [Running, Paused]);
        assert_eq!(allowed(Op::Delete), [Running, Paused, Stopped, Failed]);
        assert_eq!(Op::Delete.rule().done, None);
        assert_eq!(
            Op::Start.refusal("sb-x", Running).message,
            "sandbox sb-x is running; only a stopped or failed sandbox can be started"
        );
    }

    /// Every operation from every state, through the store's compare-and-set on a real SQLite
    /// file: it begins exactly from the states the table allows, refuses the others with the
    /// state in the message, and leaves a refused sandbox as it was.
    #[tokio::test]
    async fn every_operation_from_every_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db")).await.unwrap();
        for (n, op) in Op::VARIANTS.iter().enumerate() {
            for (m, state) in State::VARIANTS.iter().enumerate() {
                let id = format!("s{n}-{m}");
                store.insert(&crate::store::tests::record(&id), 64).await.unwrap();
                store.transition(&id, &[Creating], *state, None).await.unwrap();
                let rule = op.rule();
                let moved = store.transition(&id, rule.from, rule.working, None).await.unwrap();
                let now = store.get(&id).await.unwrap().unwrap().state;
                if rule.from.contains(state) {
                    assert_eq!((moved, now), (Some(*state), rule.working), "{op:?} from {state}");
                } else {
                    assert_eq!((moved, now), (Some(*state), *state), "{op:?} from {state} must change nothing");
                    let refusal = op.refusal(&id, *state);
                    assert_eq!(refusal.status.as_u16(), 409);
                    assert!(refusal.message.contains(state.as_str()), "{}", refusal.message);
                }
            }
        }
    }
}
