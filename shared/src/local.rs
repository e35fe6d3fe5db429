//! What the services of one process (`ultrasync serve`, `ultrasync dev`) hand each
//! other directly instead of through NATS: the gateway's commands to a sequencer
//! of its own process, and that sequencer's answers.
//!
//! - **Commands.** A sequencer registers its [`Commands`] intake. The gateway offers
//!   it each message of commands it would publish to `USYNC_CMDS`; the sequencer
//!   takes it only while it holds the lease of the stream key's partition, and
//!   hands back the ones it cannot sequence (queue full, partition given up) by
//!   publishing them to `USYNC_CMDS` itself. A refused offer goes to `USYNC_CMDS`
//!   as before. `USYNC_CMDS` keeps nothing a client relies on (a command lost
//!   before it is sequenced was never acked, and the client's outbox resends it),
//!   so a command that never passes through it loses nothing.
//! - **Answers.** Answers are core NATS messages with no delivery guarantee either
//!   way (a lost answer is recovered by the client's retry, answered from the
//!   log), so taking them straight to the gateway changes nothing a client can
//!   tell.
//!
//! Each saves nats-server the messages in and out that carried them. Services in
//! processes of their own get an empty [`Local`] and talk through NATS only.

use std::sync::{Arc, RwLock, Weak};

use bytes::Bytes;

use crate::nats::REPLY_PREFIX;

/// One command on its way from a gateway to a sequencer of the same process.
pub struct Command {
    /// The command document, as it would be one line of a `USYNC_CMDS` message.
    pub body: Bytes,
    /// Where its answer goes (`usync.reply.{gateway_id}.{session}`).
    pub reply_to: String,
    pub command_id: String,
    /// The W3C `traceparent` of its gateway span, when traced.
    pub traceparent: Option<String>,
}

/// A sequencer's intake of commands from the gateway of its process.
pub trait Commands: Send + Sync {
    /// Whether an offer for `subject` would be taken now (the partition held, the
    /// key not busy); an offer may still be refused.
    fn would_take(&self, subject: &str) -> bool;

    /// Takes the commands of one message for `subject` (`usync.cmd.{org}.{project}.
    /// {ns}`), in order, or hands them all back untouched: the caller then publishes
    /// them to `USYNC_CMDS`. Never waits.
    fn offer(&self, subject: &str, commands: Vec<Command>) -> Result<(), Vec<Command>>;
}

/// Where a gateway takes its answers: what its `usync.reply.{gateway_id}.*`
/// subscription would get.
pub trait Answers: Send + Sync {
    /// Answers of one batch for session `session`, in order.
    fn deliver(&self, session: &str, answers: Vec<Vec<u8>>);
}

/// The gateways of this process, by reply prefix. Cheap to clone; clones share.
#[derive(Clone, Default)]
pub struct Local {
    gateways: Arc<RwLock<Vec<Gateway>>>,
    sequencer: Arc<RwLock<Option<Weak<dyn Commands>>>>,
}

struct Gateway {
    /// `usync.reply.{gateway_id}.`
    prefix: String,
    answers: Weak<dyn Answers>,
}

/// A gateway's place in a [`Local`], given up when dropped.
pub struct Registration {
    local: Local,
    prefix: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.local
            .write()
            .retain(|g| g.prefix != self.prefix && g.answers.strong_count() > 0);
    }
}

/// A sequencer's intake in a [`Local`], removed when dropped.
pub struct Intake {
    local: Local,
}

impl Drop for Intake {
    fn drop(&mut self) {
        *self
            .local
            .sequencer
            .write()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Local {
    /// The sequencer of this process takes commands through `commands` while the
    /// returned [`Intake`] lives (and `commands` does).
    pub fn add_sequencer(&self, commands: &Arc<dyn Commands>) -> Intake {
        *self.sequencer.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::downgrade(commands));
        Intake {
            local: self.clone(),
        }
    }

    /// The intake of this process's sequencer, if it has one running.
    pub fn commands(&self) -> Option<Arc<dyn Commands>> {
        self.sequencer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()?
            .upgrade()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Gateway>> {
        self.gateways.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Gateway>> {
        self.gateways.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Gateway `gateway_id` of this process takes answers to its reply subjects
    /// from `answers` while the registration lives (and `answers` does).
    pub fn add_gateway(&self, gateway_id: &str, answers: &Arc<dyn Answers>) -> Registration {
        let prefix = format!("{REPLY_PREFIX}{gateway_id}.");
        let mut gateways = self.write();
        gateways.retain(|g| g.prefix != prefix && g.answers.strong_count() > 0);
        gateways.push(Gateway {
            prefix: prefix.clone(),
            answers: Arc::downgrade(answers),
        });
        Registration {
            local: self.clone(),
            prefix,
        }
    }

    /// The gateway of this process that `subject` (a `reply_to`) names, and the
    /// session in it; `None` when the answer must go through NATS.
    pub fn answers_for<'a>(&self, subject: &'a str) -> Option<(Arc<dyn Answers>, &'a str)> {
        let gateways = self.read();
        if gateways.is_empty() {
            return None;
        }
        gateways.iter().find_map(|g| {
            let session = subject.strip_prefix(g.prefix.as_str())?;
            // The subscription `usync.reply.{id}.*` matches one token only.
            if session.is_empty() || session.contains(['.', '*', '>', ' ']) {
                return None;
            }
            Some((g.answers.upgrade()?, session))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Seen(Mutex<Vec<(String, Vec<Vec<u8>>)>>);

    impl Answers for Seen {
        fn deliver(&self, session: &str, answers: Vec<Vec<u8>>) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((session.to_owned(), answers));
        }
    }

    #[test]
    fn answers_reach_the_gateway_named_by_the_subject_while_it_is_registered() {
        let local = Local::default();
        assert!(local.answers_for("usync.reply.g1.s1").is_none());
        let seen = Arc::new(Seen::default());
        let answers: Arc<dyn Answers> = seen.clone();
        let registration = local.add_gateway("g1", &answers);
        let (to, session) = local.answers_for("usync.reply.g1.s1").expect("local");
        assert_eq!(session, "s1");
        to.deliver(session, vec![b"a".to_vec()]);
        drop(to);
        assert_eq!(seen.0.lock().map(|s| s.len()).unwrap_or(0), 1);
        // Another gateway's subjects, and ones its subscription would not match,
        // go through NATS.
        for other in [
            "usync.reply.g2.s1",
            "usync.reply.g1.",
            "usync.reply.g1.s.x",
            "usync.reply.g1.*",
            "usync.reply.g10.s1",
        ] {
            assert!(local.answers_for(other).is_none(), "{other}");
        }
        drop(registration);
        assert!(local.answers_for("usync.reply.g1.s1").is_none());
        // A gateway that is gone is not answered even while registered.
        let registration = local.add_gateway("g1", &answers);
        drop(answers);
        drop(seen);
        assert!(local.answers_for("usync.reply.g1.s1").is_none());
        drop(registration);
    }
}
