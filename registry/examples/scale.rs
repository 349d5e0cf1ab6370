//! Scale check: merge and compile a table from 10,000 etcd modules and 100,000 instances,
//! reporting time and memory. Run: `cargo run --release -p space-registry --example scale`
use std::{collections::HashMap, path::Path, time::Instant};

use space_registry::{merge, parse_config, AffinityKeys, EtcdView, InstanceStates, RouteTable};

// The same allocator as the `space` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    // As the `space` binary does (see proxy/src/main.rs `tune_allocator`): mi_option_purge_delay = 1 s.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide mimalloc option before any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(15, 1000) };
    }
    let modules: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let per_module: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let file = parse_config(
        "[listeners]\nhttp = \"127.0.0.1:8080\"\n",
        Path::new("space.toml"),
    )
    .unwrap();
    let before = rss_kib();
    let t = Instant::now();
    let mut view = EtcdView::default();
    for m in 0..modules {
        let manifest = format!(
            r#"{{"name":"m{m}","prefixes":["/modules/m{m}"],"session_cookies":["PHPSESSID"],"affinity":{{}},"health_check":{{"path":"/modules/m{m}/"}}}}"#
        );
        view.put(&format!("modules/m{m}"), manifest, m as i64 + 1, 0);
        for i in 0..per_module {
            let n = m * per_module + i;
            let value = format!(
                r#"{{"addr":"10.{}.{}.{}:80","weight":1}}"#,
                n >> 16 & 255,
                n >> 8 & 255,
                n & 255
            );
            view.put(&format!("instances/m{m}/i{i}"), value, 0, 7);
        }
    }
    let parse = t.elapsed();
    let after_parse = rss_kib();
    let states = InstanceStates::new();
    let keys = AffinityKeys::generated();
    let t = Instant::now();
    let (specs, refusals) = merge(&file, Some(&view), &HashMap::new(), "/space/");
    let merged = t.elapsed();
    let table = RouteTable::compile(&specs, &states, &keys, "scale").unwrap();
    let build = t.elapsed();
    let after_build = rss_kib();
    // A second build, as on every later change: instance state is reused.
    let t = Instant::now();
    let (specs2, _) = merge(&file, Some(&view), &HashMap::new(), "/space/");
    let table2 = RouteTable::compile(&specs2, &states, &keys, "scale-2").unwrap();
    let rebuild = t.elapsed();
    assert!(
        refusals.is_empty(),
        "{:?}",
        &refusals[..refusals.len().min(3)]
    );
    assert_eq!(table.instance_count(), modules * per_module);
    assert!(table
        .lookup("x", &format!("/modules/m{}/a", modules - 1))
        .is_some());
    drop(table);
    println!("modules={modules} instances={}", modules * per_module);
    println!(
        "parse etcd values (once, as keys arrive): {:.1} ms, +{} MiB",
        parse.as_secs_f64() * 1e3,
        (after_parse - before) / 1024
    );
    println!("merge: {:.1} ms", merged.as_secs_f64() * 1e3);
    println!(
        "merge + compile (first build): {:.1} ms",
        build.as_secs_f64() * 1e3
    );
    println!(
        "merge + compile (rebuild after a change): {:.1} ms",
        rebuild.as_secs_f64() * 1e3
    );
    println!(
        "table memory: +{} MiB (RSS after first build minus after parse)",
        after_build.saturating_sub(after_parse) / 1024
    );
    println!("process RSS: {} MiB", rss_kib() / 1024);
    drop(table2);
}
