//! Desired state: the modules and instances SPACE should route, merged from the
//! configuration file, etcd and DNS, then compiled and published as one table.
//!
//! Merge rule, applied on every change:
//! 1. The file's modules come first and are taken as they are (the file was validated whole).
//! 2. etcd modules join in the order they were created; a module the file already defines is
//!    refused (the file wins), and so is one whose prefix overlaps a module already in.
//! 3. etcd instances join their module, from the file or etcd; an instance of an unknown
//!    module, or whose id repeats a static instance's, is refused.
//! 4. DNS answers add instances to modules with `dns`/`srv`.
//!
//! Every refusal names its source (file or etcd key) and reason, is logged once, counted in
//! metrics and listed in the admin API, and affects that piece alone.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use space_modules::{
    parse_json_manifest, validate_instance, DnsQuery, InstanceSpec, ModuleName, ModuleSpec,
    RawInstance,
};

use crate::{
    etcd_keys::{parse_key, EtcdKey},
    AffinityKeys, Claims, Config, InstanceStates, RouteTable, RouteTableHandle,
};

/// One etcd key, parsed when it arrived.
#[derive(Debug, Clone)]
pub struct EtcdEntry {
    pub value: String,
    pub create_revision: i64,
    pub lease: i64,
    parsed: Parsed,
}

#[derive(Debug, Clone)]
enum Parsed {
    Module(Box<ModuleSpec>),
    Instance { module: String, spec: InstanceSpec },
    Invalid(String),
    Ignored,
}

/// What SPACE knows of etcd: every key under the prefix (prefix removed), parsed.
#[derive(Debug, Clone, Default)]
pub struct EtcdView {
    /// The etcd revision this view reflects.
    pub revision: i64,
    /// True when read from the local snapshot rather than etcd.
    pub from_snapshot: bool,
    pub entries: BTreeMap<String, EtcdEntry>,
}

impl EtcdView {
    /// Records a put of `key` (prefix removed).
    pub fn put(&mut self, key: &str, value: String, create_revision: i64, lease: i64) {
        let parsed = parse_entry(key, &value);
        self.entries.insert(
            key.to_string(),
            EtcdEntry {
                value,
                create_revision,
                lease,
                parsed,
            },
        );
    }

    pub fn delete(&mut self, key: &str) {
        self.entries.remove(key);
    }
}

fn parse_entry(key: &str, value: &str) -> Parsed {
    match parse_key(key) {
        EtcdKey::Module { module } => match parse_json_manifest(value, key) {
            Ok(spec) if spec.name.as_str() == module => Parsed::Module(Box::new(spec)),
            Ok(spec) => Parsed::Invalid(format!(
                "the manifest is named `{}` but the key names `{module}`",
                spec.name
            )),
            Err(e) => Parsed::Invalid(join_issues(&e.issues)),
        },
        EtcdKey::Instance { module, id } => {
            let raw: RawInstance = match serde_json::from_str(value) {
                Ok(r) => r,
                Err(e) => {
                    return Parsed::Invalid(format!(
                        "not instance JSON ({e}); write {{\"addr\": \"10.0.0.5:80\", \"weight\": 1, \"draining\": false}}"
                    ))
                }
            };
            if raw.id.as_deref().is_some_and(|i| i != id) {
                return Parsed::Invalid(format!("the value's id differs from the key's `{id}`"));
            }
            let raw = RawInstance {
                id: Some(id.to_string()),
                ..raw
            };
            match validate_instance(&raw) {
                Ok(spec) => Parsed::Instance {
                    module: module.to_string(),
                    spec,
                },
                Err(issues) => Parsed::Invalid(join_issues(&issues)),
            }
        }
        EtcdKey::Other => Parsed::Ignored,
    }
}

/// The modules whose instances come from DNS, with their queries.
fn dns_targets<'m>(modules: impl Iterator<Item = &'m ModuleSpec>) -> Vec<(ModuleName, DnsQuery)> {
    modules
        .filter_map(|m| m.dns.clone().map(|q| (m.name.clone(), q)))
        .collect()
}

fn join_issues(issues: &[space_modules::Issue]) -> String {
    issues
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A piece of desired state that was refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Refusal {
    /// `etcd:<key>` or a file path.
    pub source: String,
    pub reason: String,
}

#[derive(Default)]
struct Sources {
    file: Option<Config>,
    etcd: Option<EtcdView>,
    dns: HashMap<ModuleName, Vec<InstanceSpec>>,
}

/// Called with the DNS targets of the merged modules after each rebuild.
pub type DnsTargetsHook = Box<dyn Fn(Vec<(ModuleName, DnsQuery)>) + Send + Sync>;

/// Owner of the sources and publisher of the tables built from them.
pub struct Desired {
    sources: Mutex<Sources>,
    states: Arc<InstanceStates>,
    routes: Arc<RouteTableHandle>,
    etcd_prefix: String,
    refusals: ArcSwap<Vec<Refusal>>,
    dns_hook: Mutex<Option<DnsTargetsHook>>,
}

impl Desired {
    pub fn new(
        states: Arc<InstanceStates>,
        routes: Arc<RouteTableHandle>,
        etcd_prefix: &str,
    ) -> Arc<Self> {
        Arc::new(Desired {
            sources: Mutex::new(Sources::default()),
            states,
            routes,
            etcd_prefix: etcd_prefix.to_string(),
            refusals: ArcSwap::from_pointee(Vec::new()),
            dns_hook: Mutex::new(None),
        })
    }

    pub fn routes(&self) -> &Arc<RouteTableHandle> {
        &self.routes
    }

    /// Installs the hook that hands DNS targets to the DNS provider, and hands it the
    /// current ones. Holding the state lock, no rebuild can slip in between.
    pub fn set_dns_hook(&self, hook: DnsTargetsHook) {
        let _state = self.lock();
        let table = self.routes.load();
        hook(dns_targets(table.modules().iter().map(|m| &m.spec)));
        *self.dns_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// What is refused right now.
    pub fn refusals(&self) -> Arc<Vec<Refusal>> {
        self.refusals.load_full()
    }

    /// A new validated configuration file. Returns the published revision, or why the
    /// table could not be built (the previous one keeps serving).
    pub fn set_file(&self, config: Config) -> Result<String, String> {
        let mut s = self.lock();
        let previous = s.file.replace(config);
        let result = self.rebuild(&s);
        if result.is_err() {
            s.file = previous;
        }
        result
    }

    /// The revision of the file configuration in use, if any.
    pub fn file_revision(&self) -> Option<String> {
        self.lock().file.as_ref().map(|f| f.revision.clone())
    }

    /// Changes the etcd view (one batch of events) and republishes.
    pub fn update_etcd(&self, change: impl FnOnce(&mut EtcdView)) -> Result<String, String> {
        let mut s = self.lock();
        change(s.etcd.get_or_insert_with(EtcdView::default));
        self.rebuild(&s)
    }

    /// A copy of the etcd view (for the snapshot file).
    pub fn etcd_view(&self) -> Option<EtcdView> {
        self.lock().etcd.clone()
    }

    /// New DNS answer for a module.
    pub fn set_dns(
        &self,
        module: &ModuleName,
        instances: Vec<InstanceSpec>,
    ) -> Result<String, String> {
        let mut s = self.lock();
        s.dns.insert(module.clone(), instances);
        self.rebuild(&s)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rebuild(&self, s: &Sources) -> Result<String, String> {
        let Some(file) = &s.file else {
            return Err("no configuration loaded".into());
        };
        let (modules, refusals) = merge(file, s.etcd.as_ref(), &s.dns, &self.etcd_prefix);
        let revision = match &s.etcd {
            Some(e) => format!(
                "file:{} etcd:{}{}",
                file.revision,
                e.revision,
                if e.from_snapshot { " (snapshot)" } else { "" }
            ),
            None => format!("file:{}", file.revision),
        };
        let keys: &AffinityKeys = &file.affinity_keys;
        let table = RouteTable::compile(&modules, &self.states, keys, &revision)
            .map_err(|e| e.join("; "))?;
        let targets = dns_targets(modules.iter());
        self.routes.publish(table);
        let old = self.refusals.load_full();
        for r in refusals.iter().filter(|r| !old.contains(r)) {
            tracing::warn!(source = %r.source, reason = %r.reason, "refused; everything else keeps working");
        }
        self.refusals.store(Arc::new(refusals));
        if let Some(hook) = self
            .dns_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            hook(targets);
        }
        Ok(revision)
    }
}

/// Merges the sources into one module list; see the module doc for the rule.
pub fn merge(
    file: &Config,
    etcd: Option<&EtcdView>,
    dns: &HashMap<ModuleName, Vec<InstanceSpec>>,
    etcd_prefix: &str,
) -> (Vec<ModuleSpec>, Vec<Refusal>) {
    let mut refusals = Vec::new();
    let mut claims = Claims::default();
    let mut modules: Vec<ModuleSpec> = Vec::with_capacity(file.modules.len());
    for m in &file.modules {
        // The file was validated whole; a claim cannot fail here.
        let _ = claims.claim(m);
        modules.push(m.clone());
    }
    let file_names: HashSet<&str> = file.modules.iter().map(|m| m.name.as_str()).collect();
    if let Some(view) = etcd {
        let source = |key: &str| format!("etcd:{etcd_prefix}{key}");
        let mut etcd_modules: Vec<(&String, &EtcdEntry, &ModuleSpec)> = view
            .entries
            .iter()
            .filter_map(|(k, e)| match &e.parsed {
                Parsed::Module(spec) => Some((k, e, spec.as_ref())),
                _ => None,
            })
            .collect();
        etcd_modules.sort_by_key(|(k, e, _)| (e.create_revision, k.as_str()));
        for (key, _, spec) in etcd_modules {
            if file_names.contains(spec.name.as_str()) {
                refusals.push(Refusal {
                    source: source(key),
                    reason: format!(
                        "module `{}` is defined in the configuration file, which wins",
                        spec.name
                    ),
                });
                continue;
            }
            match claims.claim(spec) {
                Ok(()) => modules.push(spec.clone()),
                Err(why) => refusals.push(Refusal {
                    source: source(key),
                    reason: why,
                }),
            }
        }
        let index: HashMap<String, usize> = modules
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.as_str().to_string(), i))
            .collect();
        for (key, entry) in &view.entries {
            match &entry.parsed {
                Parsed::Invalid(reason) => refusals.push(Refusal {
                    source: source(key),
                    reason: reason.clone(),
                }),
                Parsed::Instance { module, spec } => match index.get(module) {
                    None => refusals.push(Refusal {
                        source: source(key),
                        reason: format!("instance of unknown module `{module}`; register the module's manifest first"),
                    }),
                    Some(&i) => {
                        let m = &mut modules[i];
                        if m.instances.iter().any(|x| x.id == spec.id) {
                            refusals.push(Refusal {
                                source: source(key),
                                reason: format!("module `{module}` already has an instance `{}`", spec.id),
                            });
                        } else {
                            m.instances.push(spec.clone());
                        }
                    }
                },
                Parsed::Module(_) | Parsed::Ignored => {}
            }
        }
    }
    for m in modules.iter_mut().filter(|m| m.dns.is_some()) {
        if let Some(found) = dns.get(&m.name) {
            for inst in found {
                if !m.instances.iter().any(|x| x.id == inst.id) {
                    m.instances.push(inst.clone());
                }
            }
        }
    }
    (modules, refusals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn file(text: &str) -> Config {
        crate::parse_config(
            &format!("[listeners]\nhttp = \"127.0.0.1:1\"\n{text}"),
            Path::new("/x/space.toml"),
        )
        .unwrap()
    }

    fn view(kvs: &[(&str, &str)]) -> EtcdView {
        let mut v = EtcdView::default();
        for (i, (k, val)) in kvs.iter().enumerate() {
            v.put(k, val.to_string(), i as i64 + 1, 0);
        }
        v
    }

    #[test]
    fn bad_keys_are_refused_alone() {
        let f = file("[[module]]\nname = \"core\"\nprefixes = [\"/\"]\n");
        let v = view(&[
            (
                "modules/labs",
                r#"{"name":"labs","prefixes":["/modules/labs"]}"#,
            ),
            ("modules/broken", "{not json"),
            (
                "modules/clash",
                r#"{"name":"clash","prefixes":["/modules/labs"]}"#,
            ),
            ("modules/core", r#"{"name":"core","prefixes":["/core"]}"#),
            (
                "modules/misnamed",
                r#"{"name":"other","prefixes":["/other"]}"#,
            ),
            (
                "instances/labs/a",
                r#"{"addr":"127.0.0.1:9001","weight":1}"#,
            ),
            (
                "instances/labs/b",
                r#"{"addr":"127.0.0.1:9002","weight":0}"#,
            ),
            ("instances/ghost/a", r#"{"addr":"127.0.0.1:9003"}"#),
            (
                "instances/core/c1",
                r#"{"addr":"127.0.0.1:9004","draining":true}"#,
            ),
            ("unrelated", "x"),
        ]);
        let (modules, refusals) = merge(&f, Some(&v), &HashMap::new(), "/space/");
        let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, vec!["core", "labs"]);
        assert_eq!(modules[1].instances.len(), 1);
        assert!(modules[0].instances[0].draining);
        let refused: Vec<&str> = refusals.iter().map(|r| r.source.as_str()).collect();
        for k in [
            "modules/broken",
            "modules/clash",
            "modules/core",
            "modules/misnamed",
            "instances/labs/b",
            "instances/ghost/a",
        ] {
            assert!(
                refused.contains(&format!("etcd:/space/{k}").as_str()),
                "{k} not refused: {refusals:?}"
            );
        }
        assert_eq!(refusals.len(), 6, "{refusals:?}");
        let clash = refusals
            .iter()
            .find(|r| r.source.ends_with("clash"))
            .unwrap();
        assert!(clash.reason.contains("overlaps module `labs`"), "{clash:?}");
    }

    #[test]
    fn older_etcd_module_keeps_its_prefix() {
        let f = file("");
        let mut v = EtcdView::default();
        v.put(
            "modules/b",
            r#"{"name":"b","prefixes":["/x"]}"#.into(),
            5,
            0,
        );
        v.put(
            "modules/a",
            r#"{"name":"a","prefixes":["/x"]}"#.into(),
            9,
            0,
        );
        let (modules, refusals) = merge(&f, Some(&v), &HashMap::new(), "/space/");
        assert_eq!(modules[0].name.as_str(), "b");
        assert_eq!(refusals[0].source, "etcd:/space/modules/a");
    }
}
