//! Live state of each instance (health, requests in flight, failures), kept outside the
//! route table and keyed by module, instance id and address, so that swapping tables keeps
//! it and the request path reaches it without a map lookup.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering},
        Arc, Mutex, OnceLock, Weak,
    },
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap;
use space_modules::{InstanceId, ModuleName};

use crate::{ModuleStats, Token};

/// Identity of an instance's live state. A changed address is a new instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceKey {
    pub module: ModuleName,
    pub id: InstanceId,
    pub addr: SocketAddr,
}

/// What the proxy currently believes about an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Added, waiting for its first passing health check: takes no traffic.
    Pending,
    Up,
    Down,
}

const PENDING: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Live state of one instance. All fields are atomics: the request path never locks.
#[derive(Debug)]
pub struct InstanceState {
    pub key: InstanceKey,
    health: AtomicU8,
    active_checks: AtomicBool,
    check_passes: AtomicU32,
    check_fails: AtomicU32,
    request_fails: AtomicU32,
    /// Without active checks: clock_ms until which a passively failed instance stays down.
    down_until_ms: AtomicU64,
    next_check_ms: AtomicU64,
    checking: AtomicBool,
    in_flight: AtomicU32,
    requests: AtomicU64,
    /// clock_ms when the instance was first seen draining; 0 when not draining.
    draining_since_ms: AtomicU64,
    /// Routing-cookie tokens computed for a key set (its fingerprint), kept across builds.
    tokens: Mutex<Option<(u64, Vec<Token>)>>,
}

impl InstanceState {
    fn new(key: InstanceKey, active_checks: bool) -> Self {
        InstanceState {
            key,
            health: AtomicU8::new(if active_checks { PENDING } else { UP }),
            active_checks: AtomicBool::new(active_checks),
            check_passes: AtomicU32::new(0),
            check_fails: AtomicU32::new(0),
            request_fails: AtomicU32::new(0),
            down_until_ms: AtomicU64::new(0),
            next_check_ms: AtomicU64::new(0),
            checking: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            draining_since_ms: AtomicU64::new(0),
            tokens: Mutex::new(None),
        }
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            PENDING => Health::Pending,
            UP => Health::Up,
            _ => Health::Down,
        }
    }

    /// May new requests be sent here? (Ignores draining, which is table data.)
    pub fn is_available(&self) -> bool {
        match self.health.load(Ordering::Relaxed) {
            UP => true,
            DOWN if !self.active_checks.load(Ordering::Relaxed) => {
                let until = self.down_until_ms.load(Ordering::Relaxed);
                if until != 0 && clock_ms() >= until {
                    // fail_timeout elapsed: give it another chance.
                    self.request_fails.store(0, Ordering::Relaxed);
                    self.down_until_ms.store(0, Ordering::Relaxed);
                    self.health.store(UP, Ordering::Relaxed);
                    true
                } else {
                    false
                }
            }
            _ => false,
        }
    }

    /// Records an active health check result. Returns the new health when it changed.
    pub fn record_check(&self, passed: bool, rise: u32, fall: u32) -> Option<Health> {
        let before = self.health.load(Ordering::Relaxed);
        if passed {
            self.check_fails.store(0, Ordering::Relaxed);
            let passes = self.check_passes.fetch_add(1, Ordering::Relaxed) + 1;
            let needed = if before == PENDING { 1 } else { rise };
            if before != UP && passes >= needed {
                self.request_fails.store(0, Ordering::Relaxed);
                self.health.store(UP, Ordering::Relaxed);
                return Some(Health::Up);
            }
        } else {
            self.check_passes.store(0, Ordering::Relaxed);
            let fails = self.check_fails.fetch_add(1, Ordering::Relaxed) + 1;
            if before == UP && fails >= fall {
                self.health.store(DOWN, Ordering::Relaxed);
                return Some(Health::Down);
            }
        }
        None
    }

    /// Records a failed request (connect or I/O error). Returns true when this took it down.
    pub fn record_request_failure(&self, max_fails: u32, fail_timeout: Duration) -> bool {
        let fails = self.request_fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= max_fails && self.health.load(Ordering::Relaxed) == UP {
            self.check_passes.store(0, Ordering::Relaxed);
            self.down_until_ms.store(
                clock_ms() + fail_timeout.as_millis() as u64,
                Ordering::Relaxed,
            );
            self.health.store(DOWN, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Records a request that reached the instance and got a response.
    #[inline]
    pub fn record_request_success(&self) {
        if self.request_fails.load(Ordering::Relaxed) != 0 {
            self.request_fails.store(0, Ordering::Relaxed);
        }
    }

    /// Marks a request as started; the counter feeds least-connections.
    #[inline]
    pub fn begin_request(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn end_request(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Claims the next active check if it is due; the caller must call `check_done`.
    pub fn claim_check(&self, interval: Duration) -> bool {
        let now = clock_ms();
        if now < self.next_check_ms.load(Ordering::Relaxed) {
            return false;
        }
        if self.checking.swap(true, Ordering::AcqRel) {
            return false;
        }
        // A pending instance is retried quickly so that a new container takes traffic soon
        // after it starts listening; afterwards the module's interval applies.
        let wait = if self.health.load(Ordering::Relaxed) == PENDING {
            interval.min(Duration::from_millis(500))
        } else {
            interval
        };
        self.next_check_ms
            .store(now + wait.as_millis() as u64, Ordering::Relaxed);
        true
    }

    pub fn check_done(&self) {
        self.checking.store(false, Ordering::Release);
    }

    /// This instance's routing tokens for the key set `fingerprint`, computed once.
    pub fn affinity_tokens(
        &self,
        fingerprint: u64,
        compute: &dyn Fn() -> Vec<Token>,
    ) -> Vec<Token> {
        let mut cached = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        match &*cached {
            Some((fp, t)) if *fp == fingerprint => t.clone(),
            _ => {
                let t = compute();
                *cached = Some((fingerprint, t.clone()));
                t
            }
        }
    }

    /// Records whether the instance is draining; the drain clock starts the first time.
    pub fn set_draining(&self, draining: bool) {
        if !draining {
            self.draining_since_ms.store(0, Ordering::Relaxed);
        } else if self.draining_since_ms.load(Ordering::Relaxed) == 0 {
            self.draining_since_ms.store(clock_ms(), Ordering::Relaxed);
        }
    }

    /// How long the instance has been draining, if it is.
    pub fn draining_for(&self) -> Option<Duration> {
        match self.draining_since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(clock_ms().saturating_sub(since))),
        }
    }

    fn set_active_checks(&self, on: bool) {
        let was = self.active_checks.swap(on, Ordering::Relaxed);
        if was && !on && self.health.load(Ordering::Relaxed) == PENDING {
            self.health.store(UP, Ordering::Relaxed);
        }
    }
}

/// Owner of every instance's live state. Tables hold `Arc`s; this keeps `Weak`s so state
/// lives exactly as long as some table (or request) still refers to the instance.
#[derive(Debug, Default)]
pub struct InstanceStates {
    map: Mutex<FxHashMap<InstanceKey, Weak<InstanceState>>>,
    modules: Mutex<FxHashMap<ModuleName, Arc<ModuleStats>>>,
}

impl InstanceStates {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The counters of a module (kept for the life of the process).
    pub fn module_stats(&self, module: &ModuleName) -> Arc<ModuleStats> {
        let mut map = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(module.clone()).or_default().clone()
    }

    /// The state for `key`, created (pending if `active_checks`) when not yet known.
    pub fn get_or_create(&self, key: InstanceKey, active_checks: bool) -> Arc<InstanceState> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = map.get(&key).and_then(Weak::upgrade) {
            state.set_active_checks(active_checks);
            return state;
        }
        let state = Arc::new(InstanceState::new(key.clone(), active_checks));
        map.insert(key, Arc::downgrade(&state));
        if map.len() > 64 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> InstanceKey {
        InstanceKey {
            module: ModuleName("m".into()),
            id: InstanceId("a".into()),
            addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    #[test]
    fn new_instance_waits_for_first_pass_then_uses_rise_and_fall() {
        let states = InstanceStates::new();
        let s = states.get_or_create(key(), true);
        assert!(!s.is_available());
        assert_eq!(s.record_check(true, 3, 2), Some(Health::Up));
        assert_eq!(s.record_check(false, 3, 2), None);
        assert_eq!(s.record_check(false, 3, 2), Some(Health::Down));
        assert_eq!(s.record_check(true, 3, 2), None);
        assert_eq!(s.record_check(true, 3, 2), None);
        assert_eq!(s.record_check(true, 3, 2), Some(Health::Up));
    }

    #[test]
    fn state_survives_while_a_table_holds_it() {
        let states = InstanceStates::new();
        let a = states.get_or_create(key(), true);
        a.record_check(true, 1, 1);
        let b = states.get_or_create(key(), true);
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        assert_eq!(states.get_or_create(key(), true).health(), Health::Pending);
    }

    #[test]
    fn passive_failures_take_down_and_fail_timeout_restores() {
        let states = InstanceStates::new();
        let s = states.get_or_create(key(), false);
        assert!(s.is_available());
        assert!(!s.record_request_failure(2, Duration::ZERO));
        assert!(s.record_request_failure(2, Duration::ZERO));
        std::thread::sleep(Duration::from_millis(2));
        assert!(s.is_available());
    }
}
