//! How many relayed messages wait for their agent: in all, per channel and per conversation.
//! Past a cap new ones are refused with 429 (the platforms deliver them again later), so one
//! slow conversation fills only its own place.

use std::collections::HashMap;

const MAX_WAITING: usize = 1000;
const MAX_WAITING_PER_CHANNEL: usize = 200;
const MAX_WAITING_PER_CONVERSATION: usize = 20;

#[derive(Default)]
pub(super) struct Waiting {
    total: usize,
    by_channel: HashMap<String, usize>,
    by_conversation: HashMap<(String, String), usize>,
}

impl Waiting {
    /// Why one more message of this conversation may not wait, if it may not.
    pub(super) fn full(&self, channel: &str, conversation: &str) -> Option<String> {
        let in_channel = self.by_channel.get(channel).copied().unwrap_or(0);
        let in_conversation =
            self.by_conversation.get(&(channel.to_owned(), conversation.to_owned())).copied().unwrap_or(0);
        if self.total >= MAX_WAITING {
            Some(format!("{MAX_WAITING} messages are waiting already"))
        } else if in_channel >= MAX_WAITING_PER_CHANNEL {
            Some(format!("{MAX_WAITING_PER_CHANNEL} messages of channel {channel} are waiting already"))
        } else if in_conversation >= MAX_WAITING_PER_CONVERSATION {
            Some(format!("{MAX_WAITING_PER_CONVERSATION} messages of this conversation are waiting already"))
        } else {
            None
        }
    }

    pub(super) fn add(&mut self, channel: &str, conversation: &str) {
        self.total += 1;
        *self.by_channel.entry(channel.to_owned()).or_default() += 1;
        *self.by_conversation.entry((channel.to_owned(), conversation.to_owned())).or_default() += 1;
    }

    pub(super) fn remove(&mut self, channel: &str, conversation: &str) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.by_channel.get_mut(channel) {
            *n -= 1;
            if *n == 0 {
                self.by_channel.remove(channel);
            }
        }
        let key = (channel.to_owned(), conversation.to_owned());
        if let Some(n) = self.by_conversation.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.by_conversation.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_conversation_fills_only_its_own_place() {
        let mut w = Waiting::default();
        for _ in 0..MAX_WAITING_PER_CONVERSATION {
            assert!(w.full("tg", "chat-1").is_none());
            w.add("tg", "chat-1");
        }
        assert!(w.full("tg", "chat-1").unwrap().contains("this conversation"));
        assert!(w.full("tg", "chat-2").is_none());
        assert!(w.full("slack", "c").is_none());
        w.remove("tg", "chat-1");
        assert!(w.full("tg", "chat-1").is_none());
    }
}
