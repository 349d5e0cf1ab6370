//! Choosing an instance for a new request: smooth weighted round robin, least connections
//! or weighted rendezvous (consistent) hashing, over instances that are up and not draining.
//!
//! Weights are at least 1 (validation refuses 0), so no policy can divide by or panic on
//! zero. Draining instances are used only when nothing else is available.
use std::sync::atomic::{AtomicUsize, Ordering};

use space_modules::LoadBalancing;

use crate::CompiledInstance;

/// The request key a consistent hash is computed on (already hashed with [`PickKey::hash`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PickKey(pub u64);

impl PickKey {
    /// FNV-1a: stable across processes and releases, so replicas agree.
    pub fn hash(bytes: &[u8]) -> PickKey {
        PickKey(fnv1a(bytes))
    }
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Per-module instance chooser, built with the table.
#[derive(Debug)]
pub struct Picker {
    policy: LoadBalancing,
    /// Instance indices in smooth-weighted-round-robin order (one cycle).
    sequence: Box<[u32]>,
    cursor: AtomicUsize,
}

impl Picker {
    pub fn new(policy: &LoadBalancing, instances: &[CompiledInstance]) -> Picker {
        Picker {
            policy: policy.clone(),
            sequence: smooth_wrr_sequence(instances),
            cursor: AtomicUsize::new(0),
        }
    }

    /// Chooses an instance for a request without affinity. `key` is used by consistent
    /// hashing; `skip(i)` excludes instances already tried for this request.
    pub fn pick(
        &self,
        instances: &[CompiledInstance],
        key: Option<PickKey>,
        skip: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let usable = |i: usize, allow_draining: bool| {
            let inst = &instances[i];
            (allow_draining || !inst.spec.draining) && !skip(i) && inst.state.is_available()
        };
        for allow_draining in [false, true] {
            let found = match (&self.policy, key) {
                (LoadBalancing::ConsistentHash(_), Some(key)) => {
                    rendezvous(instances, key, |i| usable(i, allow_draining))
                }
                (LoadBalancing::LeastConnections, _) => {
                    self.least_connections(instances, |i| usable(i, allow_draining))
                }
                _ => self.round_robin(instances.len(), |i| usable(i, allow_draining)),
            };
            if found.is_some() {
                return found;
            }
        }
        None
    }

    /// Picks by rendezvous hash among usable instances, whatever the module's policy
    /// (used for session-cookie fallback affinity).
    pub fn pick_hashed(
        &self,
        instances: &[CompiledInstance],
        key: PickKey,
        skip: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        rendezvous(instances, key, |i| {
            !instances[i].spec.draining && !skip(i) && instances[i].state.is_available()
        })
    }

    fn round_robin(&self, n: usize, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.sequence.len();
        if len == 0 || n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        (0..len)
            .map(|step| self.sequence[(start + step) % len] as usize)
            .find(|&i| usable(i))
    }

    fn least_connections(
        &self,
        instances: &[CompiledInstance],
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = instances.len();
        if n == 0 {
            return None;
        }
        // Rotate the starting point so ties spread instead of piling on the first.
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, u64, u64)> = None;
        for step in 0..n {
            let i = (start + step) % n;
            if !usable(i) {
                continue;
            }
            let load = u64::from(instances[i].state.in_flight());
            let weight = u64::from(instances[i].spec.weight.max(1));
            let better = match best {
                None => true,
                // load_i / weight_i < load_b / weight_b
                Some((_, bl, bw)) => load * bw < bl * weight,
            };
            if better {
                best = Some((i, load, weight));
            }
        }
        best.map(|(i, _, _)| i)
    }
}

fn rendezvous(
    instances: &[CompiledInstance],
    key: PickKey,
    usable: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, inst) in instances.iter().enumerate() {
        if !usable(i) {
            continue;
        }
        let h = splitmix(key.0 ^ inst.id_hash);
        // Uniform in (0, 1]; weighted rendezvous score = -w / ln(u).
        let u = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let score = -f64::from(inst.spec.weight.max(1)) / u.ln().min(-f64::MIN_POSITIVE);
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

/// nginx's smooth weighted round robin, unrolled into one cycle of indices.
fn smooth_wrr_sequence(instances: &[CompiledInstance]) -> Box<[u32]> {
    let weights: Vec<i64> = instances
        .iter()
        .map(|i| i64::from(i.spec.weight.max(1)))
        .collect();
    let g = weights.iter().fold(0, |a, &b| gcd(a, b)).max(1);
    let weights: Vec<i64> = weights.iter().map(|w| w / g).collect();
    let total: i64 = weights.iter().sum();
    // Keep the cycle bounded; beyond this the order repeats with rounding.
    let cycle = total.min(65_536) as usize;
    let mut current = vec![0i64; weights.len()];
    let mut seq = Vec::with_capacity(cycle);
    for _ in 0..cycle {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        seq.push(best as u32);
    }
    seq.into_boxed_slice()
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InstanceKey, InstanceStates};
    use space_modules::{HashOn, InstanceId, InstanceSpec, ModuleName};
    use std::sync::Arc;

    fn instances(weights: &[u32], states: &InstanceStates) -> Vec<CompiledInstance> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let spec = InstanceSpec {
                    id: InstanceId(Arc::from(format!("i{i}"))),
                    addr: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    weight: w,
                    draining: false,
                };
                CompiledInstance::new(
                    spec.clone(),
                    states.get_or_create(
                        InstanceKey {
                            module: ModuleName("m".into()),
                            id: spec.id.clone(),
                            addr: spec.addr,
                        },
                        false,
                    ),
                )
            })
            .collect()
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_proportional() {
        let states = InstanceStates::new();
        let inst = instances(&[5, 1, 1], &states);
        let p = Picker::new(&LoadBalancing::RoundRobin, &inst);
        let picks: Vec<_> = (0..7)
            .map(|_| p.pick(&inst, None, |_| false).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 5);
        // smooth: never three in a row of the heavy one at the start of a cycle like 0,0,0,0,0,1,2
        assert_ne!(&picks[..5], &[0, 0, 0, 0, 0]);
    }

    #[test]
    fn skips_unavailable_and_draining() {
        let states = InstanceStates::new();
        let mut inst = instances(&[1, 1, 1], &states);
        inst[0]
            .state
            .record_request_failure(1, std::time::Duration::from_secs(60));
        inst[1].spec.draining = true;
        let p = Picker::new(&LoadBalancing::RoundRobin, &inst);
        for _ in 0..10 {
            assert_eq!(p.pick(&inst, None, |_| false), Some(2));
        }
        // With only the draining one left, it is used rather than failing.
        assert_eq!(p.pick(&inst, None, |i| i == 2), Some(1));
    }

    #[test]
    fn rendezvous_moves_few_keys_when_an_instance_is_added() {
        let states = InstanceStates::new();
        let three = instances(&[1, 1, 1], &states);
        let four = instances(&[1, 1, 1, 1], &states);
        let policy = LoadBalancing::ConsistentHash(HashOn::ClientIp);
        let p3 = Picker::new(&policy, &three);
        let p4 = Picker::new(&policy, &four);
        let mut moved = 0;
        for k in 0..1000u32 {
            let key = PickKey::hash(&k.to_le_bytes());
            let a = p3.pick(&three, Some(key), |_| false).unwrap();
            let b = p4.pick(&four, Some(key), |_| false).unwrap();
            if a != b {
                assert_eq!(b, 3, "a key may only move to the new instance");
                moved += 1;
            }
        }
        assert!(moved > 150 && moved < 350, "moved {moved}");
    }

    #[test]
    fn least_connections_prefers_idle() {
        let states = InstanceStates::new();
        let inst = instances(&[1, 1], &states);
        inst[0].state.begin_request();
        let p = Picker::new(&LoadBalancing::LeastConnections, &inst);
        for _ in 0..4 {
            assert_eq!(p.pick(&inst, None, |_| false), Some(1));
        }
    }
}
