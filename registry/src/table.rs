//! The route table: modules compiled for lookup by host and longest path prefix.
//!
//! Lookup order: routes whose hosts name the request host exactly, then wildcard hosts
//! (longest suffix first), then routes for any host; within each, the longest prefix on a
//! segment boundary wins. A table is immutable; a change builds a new one.
use std::{fmt::Write as _, sync::Arc};

use rustc_hash::FxHashMap;

use space_modules::{HostPattern, InstanceSpec, ModuleSpec};

use crate::{
    balance::fnv1a, AffinityKeys, InstanceKey, InstanceState, InstanceStates, ModuleAffinity,
    ModuleStats, Picker,
};

/// An instance as the request path sees it: its spec and its live state.
#[derive(Debug, Clone)]
pub struct CompiledInstance {
    pub spec: InstanceSpec,
    pub state: Arc<InstanceState>,
    /// Stable hash of the instance id, for rendezvous hashing.
    pub id_hash: u64,
}

impl CompiledInstance {
    pub fn new(spec: InstanceSpec, state: Arc<InstanceState>) -> Self {
        let id_hash = fnv1a(spec.id.as_str().as_bytes());
        CompiledInstance {
            spec,
            state,
            id_hash,
        }
    }
}

/// A module ready to serve: its spec, instances and chooser.
#[derive(Debug)]
pub struct CompiledModule {
    pub spec: ModuleSpec,
    pub instances: Vec<CompiledInstance>,
    pub picker: Picker,
    pub stats: Arc<ModuleStats>,
    /// Routing-cookie tokens, when the module has affinity on.
    pub affinity: Option<ModuleAffinity>,
}

#[derive(Debug, Default)]
struct PrefixMap {
    /// Prefix -> (module index, index of the prefix in the module's `prefixes`).
    by_prefix: FxHashMap<Box<str>, (u32, u16)>,
}

impl PrefixMap {
    /// The module and prefix for `path`, and the prefix's length.
    fn lookup(&self, path: &str) -> Option<((u32, u16), usize)> {
        if self.by_prefix.is_empty() {
            return None;
        }
        let mut candidate = path;
        loop {
            if let Some(&m) = self.by_prefix.get(candidate) {
                return Some((m, candidate.len()));
            }
            match candidate.rfind('/') {
                Some(0) if candidate.len() > 1 => candidate = "/",
                Some(0) | None => return None,
                Some(i) => candidate = &candidate[..i],
            }
        }
    }
}

/// The result of a lookup.
#[derive(Debug, Clone, Copy)]
pub struct RouteMatch<'t> {
    pub module: &'t CompiledModule,
    pub module_index: usize,
    /// Length of the matched prefix (for `strip_prefix`); 1 for the root.
    pub prefix_len: usize,
    /// Index of the matched prefix in the module's `prefixes` (the routing cookie's Path).
    pub prefix_index: u16,
}

/// Every route, compiled. Carries the revision of the state it came from.
#[derive(Debug, Default)]
pub struct RouteTable {
    modules: Vec<CompiledModule>,
    exact_hosts: FxHashMap<Box<str>, PrefixMap>,
    /// By suffix with its leading dot (`.example.org`): a wildcard covers exactly one label,
    /// so the only candidate for a host is the part from its first dot.
    wildcard_hosts: FxHashMap<Box<str>, PrefixMap>,
    any_host: PrefixMap,
    revision: String,
    keys: Option<AffinityKeys>,
}

impl RouteTable {
    /// An empty table (every request gets 404) with a revision label.
    pub fn empty(revision: &str) -> Self {
        RouteTable {
            revision: revision.into(),
            ..Default::default()
        }
    }

    /// Compiles `modules`. Fails, naming both modules, when two claim the same prefix for
    /// the same host, or when a module name repeats.
    pub fn compile(
        modules: &[ModuleSpec],
        states: &InstanceStates,
        keys: &AffinityKeys,
        revision: &str,
    ) -> Result<RouteTable, Vec<String>> {
        let refs: Vec<&ModuleSpec> = modules.iter().collect();
        let conflicts = find_conflicts(&refs);
        if !conflicts.is_empty() {
            return Err(conflicts.into_iter().map(|(_, why)| why).collect());
        }
        let mut table = RouteTable::empty(revision);
        table.keys = Some(keys.clone());
        for (index, spec) in modules.iter().enumerate() {
            let active = spec.health_check.enabled;
            let instances: Vec<CompiledInstance> = spec
                .instances
                .iter()
                .map(|inst| {
                    let key = InstanceKey {
                        module: spec.name.clone(),
                        id: inst.id.clone(),
                        addr: inst.addr,
                    };
                    let state = states.get_or_create(key, active);
                    state.set_draining(inst.draining);
                    CompiledInstance::new(inst.clone(), state)
                })
                .collect();
            let affinity = spec.affinity.as_ref().map(|a| {
                let ids: Vec<&str> = spec.instances.iter().map(|i| i.id.as_str()).collect();
                ModuleAffinity::compile(a, spec.name.as_str(), &ids, keys, |i, compute| {
                    instances[i]
                        .state
                        .affinity_tokens(keys.fingerprint(), compute)
                })
            });
            let picker = Picker::new(&spec.load_balancing, &instances);
            for (prefix_index, prefix) in spec.prefixes.iter().enumerate() {
                let key: Box<str> = prefix.as_str().into();
                let target = (index as u32, prefix_index as u16);
                if spec.hosts.is_empty() {
                    table.any_host.by_prefix.insert(key.clone(), target);
                }
                for host in &spec.hosts {
                    let map = match host {
                        HostPattern::Exact(h) => table.exact_hosts.entry((**h).into()).or_default(),
                        HostPattern::Wildcard(s) => {
                            table.wildcard_hosts.entry((**s).into()).or_default()
                        }
                    };
                    map.by_prefix.insert(key.clone(), target);
                }
            }
            table.modules.push(CompiledModule {
                spec: spec.clone(),
                instances,
                picker,
                stats: states.module_stats(&spec.name),
                affinity,
            });
        }
        Ok(table)
    }

    /// Finds the module for a request. `host` must be lowercase without port; `path` normalized.
    pub fn lookup(&self, host: &str, path: &str) -> Option<RouteMatch<'_>> {
        let hit = self
            .exact_hosts
            .get(host)
            .and_then(|m| m.lookup(path))
            .or_else(|| {
                let dot = host.find('.').filter(|&i| i > 0)?;
                self.wildcard_hosts.get(&host[dot..])?.lookup(path)
            })
            .or_else(|| self.any_host.lookup(path));
        hit.map(|((index, prefix_index), prefix_len)| RouteMatch {
            module: &self.modules[index as usize],
            module_index: index as usize,
            prefix_len,
            prefix_index,
        })
    }

    pub fn modules(&self) -> &[CompiledModule] {
        &self.modules
    }

    pub fn module(&self, name: &str) -> Option<&CompiledModule> {
        self.modules.iter().find(|m| m.spec.name.as_str() == name)
    }

    /// Where this table came from: a file hash or an etcd revision.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// The keys this table's routing cookies were computed with.
    pub fn affinity_keys(&self) -> Option<&AffinityKeys> {
        self.keys.as_ref()
    }

    pub fn instance_count(&self) -> usize {
        self.modules.iter().map(|m| m.instances.len()).sum()
    }
}

/// The names and routes already taken, so that a module that would overlap is refused
/// (and takes nothing). Used to validate a file, and to merge etcd modules one by one.
#[derive(Debug, Default)]
pub struct Claims {
    names: rustc_hash::FxHashSet<String>,
    /// (host scope, prefix) -> owning module.
    routes: FxHashMap<(String, String), String>,
}

const ANY_HOST: &str = "*any*";

impl Claims {
    /// Takes `m`'s name and routes, or says why it cannot.
    pub fn claim(&mut self, m: &ModuleSpec) -> Result<(), String> {
        if self.names.contains(m.name.as_str()) {
            return Err(format!("module name `{}` is defined twice", m.name));
        }
        let scopes: Vec<String> = if m.hosts.is_empty() {
            vec![ANY_HOST.into()]
        } else {
            m.hosts.iter().map(|h| h.to_string()).collect()
        };
        let mut wanted = Vec::new();
        for scope in &scopes {
            for p in &m.prefixes {
                let key = (scope.clone(), p.as_str().to_string());
                if let Some(owner) = self.routes.get(&key) {
                    let mut why = format!(
                        "prefix `{}` of module `{}` overlaps module `{}`, which routes the same prefix",
                        p, m.name, owner
                    );
                    if scope != ANY_HOST {
                        let _ = write!(why, " for host `{scope}`");
                    }
                    return Err(why);
                }
                wanted.push(key);
            }
        }
        self.names.insert(m.name.as_str().to_string());
        for key in wanted {
            self.routes.insert(key, m.name.as_str().to_string());
        }
        Ok(())
    }
}

/// Modules that cannot join those before them: `(index, reason)`.
pub fn find_conflicts(modules: &[&ModuleSpec]) -> Vec<(usize, String)> {
    let mut claims = Claims::default();
    modules
        .iter()
        .enumerate()
        .filter_map(|(i, m)| claims.claim(m).err().map(|why| (i, why)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use space_modules::parse_toml_manifest;

    fn module(text: &str) -> ModuleSpec {
        parse_toml_manifest(text, "t.toml").unwrap()
    }

    fn table() -> RouteTable {
        let modules = vec![
            module("name = \"core\"\nprefixes = [\"/\"]"),
            module("name = \"portal\"\nprefixes = [\"/patient_portal\"]"),
            module("name = \"labs\"\nprefixes = [\"/modules/labs\"]"),
            module("name = \"tenant\"\nprefixes = [\"/\"]\nhosts = [\"clinic.example.org\"]"),
            module("name = \"wild\"\nprefixes = [\"/\"]\nhosts = [\"*.example.org\"]"),
        ];
        RouteTable::compile(
            &modules,
            &InstanceStates::new(),
            &AffinityKeys::generated(),
            "r1",
        )
        .unwrap()
    }

    fn name<'a>(t: &'a RouteTable, host: &str, path: &str) -> &'a str {
        t.lookup(host, path).unwrap().module.spec.name.as_str()
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let t = table();
        assert_eq!(name(&t, "x", "/patient_portal"), "portal");
        assert_eq!(name(&t, "x", "/patient_portal/"), "portal");
        assert_eq!(name(&t, "x", "/patient_portal/home.php"), "portal");
        assert_eq!(name(&t, "x", "/patient_portalx"), "core");
        assert_eq!(name(&t, "x", "/modules/labs/a/b"), "labs");
        assert_eq!(name(&t, "x", "/modules/lab"), "core");
        assert_eq!(name(&t, "x", "/"), "core");
        assert_eq!(t.lookup("x", "/patient_portal/a").unwrap().prefix_len, 15);
    }

    #[test]
    fn host_routes_come_first_then_fall_back() {
        let t = table();
        assert_eq!(name(&t, "clinic.example.org", "/interface"), "tenant");
        assert_eq!(name(&t, "other.example.org", "/interface"), "wild");
        assert_eq!(name(&t, "a.b.example.org", "/interface"), "core");
        assert_eq!(name(&t, "example.org", "/"), "core");
    }

    #[test]
    fn same_prefix_same_host_is_refused_with_both_names() {
        let modules = vec![
            module("name = \"a\"\nprefixes = [\"/x\"]"),
            module("name = \"b\"\nprefixes = [\"/x/\"]"),
        ];
        let errs = RouteTable::compile(
            &modules,
            &InstanceStates::new(),
            &AffinityKeys::generated(),
            "r",
        )
        .unwrap_err();
        assert!(
            errs[0].contains("`/x`") && errs[0].contains("`a`") && errs[0].contains("`b`"),
            "{errs:?}"
        );
        let ok = vec![
            module("name = \"a\"\nprefixes = [\"/x\"]"),
            module("name = \"b\"\nprefixes = [\"/x\"]\nhosts = [\"b.example\"]"),
        ];
        assert!(
            RouteTable::compile(&ok, &InstanceStates::new(), &AffinityKeys::generated(), "r")
                .is_ok()
        );
    }

    #[test]
    fn no_route_without_root() {
        let modules = vec![module("name = \"a\"\nprefixes = [\"/x\"]")];
        let t = RouteTable::compile(
            &modules,
            &InstanceStates::new(),
            &AffinityKeys::generated(),
            "r",
        )
        .unwrap();
        assert!(t.lookup("h", "/y").is_none());
        assert!(t.lookup("h", "/").is_none());
    }
}
