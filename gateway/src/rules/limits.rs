//! How much one caller may hold or send, whatever door it uses (SPEC invariant 9):
//! frames per socket, commands per actor across its sockets *and* HTTP (a batch costs
//! one token per command), HTTP requests per actor and per org, sockets per actor and
//! per org.
//! Every table here drops entries nobody uses, so none grows with the number of
//! actors ever seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use ultrasync_shared::ErrorCode;
use ultrasync_shared::auth::Principal;
use ultrasync_shared::config::GatewayConfig;

use super::Refusal;

/// A token bucket: `rate` per second, bursts of twice that.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// Refusals in the window that started at `window`.
    refused: u32,
    window: Instant,
}

/// How long refusals are counted together.
const REFUSAL_WINDOW: Duration = Duration::from_secs(1);

impl RateLimit {
    pub fn new(per_sec: u32) -> Self {
        let rate = f64::from(per_sec);
        Self {
            rate,
            burst: rate * 2.0,
            tokens: rate * 2.0,
            last: Instant::now(),
            refused: 0,
            window: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
    }

    /// True when one more may pass.
    pub fn take(&mut self) -> bool {
        self.take_n(1)
    }

    /// True when `n` more may pass (all or nothing).
    pub fn take_n(&mut self, n: usize) -> bool {
        self.refill();
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            if self.window.elapsed() > REFUSAL_WINDOW {
                self.window = Instant::now();
                self.refused = 0;
            }
            self.refused = self.refused.saturating_add(1);
            false
        }
    }

    /// A client refused a whole burst's worth of times within a second is not slowing
    /// down (the few frames let through as tokens refill do not excuse it): closed.
    pub fn exhausted(&self) -> bool {
        f64::from(self.refused) > self.burst
    }

    /// Full again and unused for a while: the entry can go.
    fn idle(&self) -> bool {
        self.last.elapsed()
            > Duration::from_secs(2) + Duration::from_secs_f64(self.burst / self.rate.max(1.0))
    }
}

/// Token buckets by key (`org/actor`, or an org), swept of idle entries as the table
/// grows.
#[derive(Debug)]
struct Buckets {
    per_sec: u32,
    table: Mutex<HashMap<String, RateLimit>>,
}

impl Buckets {
    fn new(per_sec: u32) -> Self {
        Self {
            per_sec,
            table: Mutex::new(HashMap::new()),
        }
    }

    fn take(&self, key: &str, n: usize) -> bool {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if table.len() >= 4096 && table.len().is_power_of_two() {
            table.retain(|_, b| !b.idle());
        }
        match table.get_mut(key) {
            Some(bucket) => bucket.take_n(n),
            None => {
                let mut bucket = RateLimit::new(self.per_sec);
                let took = bucket.take_n(n);
                table.insert(key.to_owned(), bucket);
                took
            }
        }
    }
}

fn actor_key(principal: &Principal) -> String {
    format!("{}/{}", principal.org, principal.actor_id)
}

/// The gateway's budgets for every caller.
#[derive(Debug)]
pub struct Budgets {
    commands: Buckets,
    requests: Buckets,
    org_requests: Buckets,
    sockets: Arc<SocketCounts>,
    per_actor: usize,
    per_org: usize,
    log_reads: Arc<LogReads>,
}

/// Reads of the op log that locate where they start (HTTP `ops` pages, `history`,
/// a socket's catch-up past the recent ops): each is a search of the stream, a few
/// dozen requests to the nats-server every org shares. An org has at most
/// `gateway.log_reads_per_org` of them running on a gateway; the others wait in line
/// (an HTTP request until its timeout). Orgs with none leave the map.
#[derive(Debug)]
struct LogReads {
    per_org: usize,
    orgs: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

/// One of an org's log reads at a time; the next in line goes when it is dropped.
#[derive(Debug)]
pub struct LogRead {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    reads: Arc<LogReads>,
    org: String,
}

impl Drop for LogRead {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut orgs = self.reads.orgs.lock().unwrap_or_else(|p| p.into_inner());
        // Nobody holds or waits for the org's line but the map: it goes.
        if orgs
            .get(&self.org)
            .is_some_and(|line| Arc::strong_count(line) == 1)
        {
            orgs.remove(&self.org);
        }
    }
}

#[derive(Debug, Default)]
struct SocketCounts {
    actors: Mutex<HashMap<String, usize>>,
    orgs: Mutex<HashMap<String, usize>>,
}

/// Holds one of an actor's and its org's sockets; released on drop.
#[derive(Debug)]
pub struct SocketSlot {
    counts: Arc<SocketCounts>,
    actor: String,
    org: String,
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        release(&self.counts.actors, &self.actor);
        release(&self.counts.orgs, &self.org);
    }
}

fn release(table: &Mutex<HashMap<String, usize>>, key: &str) {
    let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = t.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            t.remove(key);
        }
    }
}

impl Budgets {
    pub fn new(config: &GatewayConfig) -> Self {
        Self {
            commands: Buckets::new(config.max_commands_per_sec_per_actor),
            requests: Buckets::new(config.max_messages_per_sec),
            org_requests: Buckets::new(config.max_requests_per_sec_per_org),
            sockets: Arc::default(),
            per_actor: config.max_sockets_per_actor,
            per_org: config.max_sockets_per_org,
            log_reads: Arc::new(LogReads {
                per_org: config.log_reads_per_org,
                orgs: Mutex::default(),
            }),
        }
    }

    /// A turn of `org` to read the op log, waiting while it has its share running.
    pub async fn log_read(&self, org: &str) -> LogRead {
        LogReads::turn(&self.log_reads, org).await
    }

    /// The org lines of log reads, for a task that reads the log later.
    pub fn log_reads(&self) -> LogReadLines {
        LogReadLines(self.log_reads.clone())
    }

    /// `n` commands of `principal`, from any socket or HTTP request.
    pub fn commands(&self, principal: &Principal, n: usize) -> Result<(), Refusal> {
        match self.commands.take(&actor_key(principal), n) {
            true => Ok(()),
            false => Err(Refusal::new(
                ErrorCode::RateLimited,
                "too many commands for this actor; slow down and retry",
            )),
        }
    }

    /// One HTTP request of `principal`, within its actor's and its org's rate.
    pub fn request(&self, principal: &Principal) -> Result<(), Refusal> {
        if !self.requests.take(&actor_key(principal), 1) {
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                "too many requests; slow down",
            ));
        }
        if !self.org_requests.take(principal.org.as_str(), 1) {
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                "too many requests from this org; slow down",
            ));
        }
        Ok(())
    }

    /// A socket for `principal`, within its actor's and its org's share.
    pub fn open_socket(&self, principal: &Principal) -> Result<SocketSlot, Refusal> {
        let actor = actor_key(principal);
        let org = principal.org.to_string();
        let mut actors = self
            .sockets
            .actors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut orgs = self.sockets.orgs.lock().unwrap_or_else(|p| p.into_inner());
        let a = actors.get(&actor).copied().unwrap_or(0);
        let o = orgs.get(&org).copied().unwrap_or(0);
        if a >= self.per_actor {
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                format!("this actor already has {a} open sockets (the limit)"),
            ));
        }
        if o >= self.per_org {
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                format!("this org already has {o} open sockets (the limit)"),
            ));
        }
        *actors.entry(actor.clone()).or_default() += 1;
        *orgs.entry(org.clone()).or_default() += 1;
        Ok(SocketSlot {
            counts: self.sockets.clone(),
            actor,
            org,
        })
    }
}

/// The gateway's lines of log reads, by org ([`Budgets::log_read`]).
#[derive(Debug, Clone)]
pub struct LogReadLines(Arc<LogReads>);

impl LogReadLines {
    /// A turn of `org` to read the op log, waiting while it has its share running.
    pub async fn turn(&self, org: &str) -> LogRead {
        LogReads::turn(&self.0, org).await
    }

    /// Orgs with a log read running or waiting.
    #[cfg(test)]
    fn orgs(&self) -> usize {
        self.0.orgs.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl LogReads {
    async fn turn(reads: &Arc<Self>, org: &str) -> LogRead {
        let line = {
            let mut orgs = reads.orgs.lock().unwrap_or_else(|p| p.into_inner());
            orgs.entry(org.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(reads.per_org)))
                .clone()
        };
        // The semaphore is never closed.
        let permit = line.acquire_owned().await.ok();
        LogRead {
            permit,
            reads: reads.clone(),
            org: org.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_org_reads_the_log_within_its_share_and_others_are_not_held() {
        use futures::FutureExt as _;
        let budgets = Budgets::new(&GatewayConfig {
            log_reads_per_org: 2,
            ..GatewayConfig::default()
        });
        let lines = budgets.log_reads();
        let a1 = budgets.log_read("acme").await;
        let a2 = lines.turn("acme").await;
        let mut a3 = Box::pin(lines.turn("acme"));
        assert!(
            a3.as_mut().now_or_never().is_none(),
            "a third read of acme waits"
        );
        let b1 = budgets
            .log_read("other")
            .now_or_never()
            .expect("another org reads at once");
        drop(a1);
        let a3 = a3
            .now_or_never()
            .expect("acme's next read goes when one ends");
        assert_eq!(lines.orgs(), 2);
        drop((a2, a3, b1));
        assert_eq!(lines.orgs(), 0, "orgs with no reads leave the map");
    }
    use ultrasync_shared::Id;

    fn principal(org: &str, actor: &str) -> Principal {
        Principal {
            actor_id: Id::parse("sub", actor).expect("id"),
            org: Id::parse("org", org).expect("id"),
            projects: vec!["*".into()],
            read: true,
            write: true,
            admin: false,
            namespaces: None,
            exp: u64::MAX,
            credential: Default::default(),
        }
    }

    fn config() -> GatewayConfig {
        GatewayConfig {
            max_sockets_per_actor: 2,
            max_sockets_per_org: 3,
            max_commands_per_sec_per_actor: 10,
            max_messages_per_sec: 10,
            max_requests_per_sec_per_org: 15,
            ..GatewayConfig::default()
        }
    }

    #[test]
    fn sockets_are_counted_per_actor_and_org_and_released() {
        let b = Budgets::new(&config());
        let a1 = principal("acme", "a1");
        let s1 = b.open_socket(&a1).expect("first");
        let s2 = b.open_socket(&a1).expect("second");
        assert_eq!(
            b.open_socket(&a1).expect_err("third").code,
            ErrorCode::RateLimited
        );
        let s3 = b
            .open_socket(&principal("acme", "a2"))
            .expect("org has room");
        assert!(
            b.open_socket(&principal("acme", "a3")).is_err(),
            "org is full"
        );
        assert!(
            b.open_socket(&principal("other", "a1")).is_ok(),
            "another org"
        );
        drop((s1, s2, s3));
        assert!(b.sockets.actors.lock().expect("lock").is_empty());
        assert!(b.open_socket(&a1).is_ok());
    }

    #[test]
    fn a_batch_costs_one_token_per_command() {
        let b = Budgets::new(&config());
        let p = principal("acme", "a1");
        b.commands(&p, 15).expect("within the burst of 20");
        assert!(b.commands(&p, 10).is_err(), "only 5 left");
        b.commands(&p, 5).expect("the rest");
        assert!(
            b.commands(&principal("acme", "a2"), 20).is_ok(),
            "per actor"
        );
    }

    #[test]
    fn an_org_has_a_request_rate_over_all_its_actors() {
        let b = Budgets::new(&config());
        // Bursts of 20 per actor, 30 per org.
        for _ in 0..20 {
            b.request(&principal("acme", "a1")).expect("a1's burst");
        }
        let refused = b.request(&principal("acme", "a1")).expect_err("a1 is out");
        assert_eq!(refused.code, ErrorCode::RateLimited);
        for _ in 0..10 {
            b.request(&principal("acme", "a2")).expect("the org's rest");
        }
        let refused = b
            .request(&principal("acme", "a2"))
            .expect_err("acme is out");
        assert!(refused.message.contains("org"), "{}", refused.message);
        b.request(&principal("other", "a1"))
            .expect("another org has its own rate");
    }
}
