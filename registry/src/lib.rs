//! Desired state and its compilation: what SPACE should route, where it comes from, and the
//! immutable [`RouteTable`] the request path reads.
//!
//! Sources (today the configuration file and its manifests directory) produce a validated
//! [`Config`]; [`RouteTable::compile`] turns its modules into a table; [`RouteTableHandle`]
//! publishes tables whole. Health and load state live in [`InstanceState`]s owned by
//! [`InstanceStates`], outside any table, so a swap never resets them.
#![forbid(unsafe_code)]

mod affinity;
mod balance;
mod config;
mod desired;
pub mod dns;
mod etcd;
pub mod etcd_keys;
mod instance;
mod publish;
mod stats;
mod table;

pub use affinity::{AffinityKeys, CookieVerdict, ModuleAffinity, Token};
pub use balance::{PickKey, Picker};
pub use config::{
    load_config, normalize_prefix, parse_config, Config, ConfigError, ConfigIssue, DnsSettings,
    EtcdSettings, ListenerSettings, ServerSettings, TlsSettings,
};
pub use desired::{merge, Desired, DnsTargetsHook, EtcdEntry, EtcdView, Refusal};
pub use dns::{DnsDiscovery, DnsError, DnsStatus, DnsUpdateFn};
pub use etcd::{EtcdProvider, EtcdStats};
pub use instance::{Health, InstanceKey, InstanceState, InstanceStates};
pub use publish::RouteTableHandle;
pub use stats::{ModuleStats, LATENCY_BUCKETS_MS};
pub use table::{find_conflicts, Claims, CompiledInstance, CompiledModule, RouteMatch, RouteTable};
