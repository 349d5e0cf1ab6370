//! Route lookup, routing-cookie verification and table compilation.
//! Run: `cargo bench -p space-registry --bench route_lookup`
use std::{hint::black_box, sync::Arc};

use criterion::{criterion_group, criterion_main, Criterion};
use space_modules::{parse_toml_manifest, InstanceId, InstanceSpec, ModuleSpec};
use space_registry::{AffinityKeys, InstanceStates, RouteTable};

fn ehr_modules(extra: usize) -> Vec<ModuleSpec> {
    let mut modules = vec![
        parse_toml_manifest(
            "name = \"core\"\nprefixes = [\"/\"]\nsession_cookies = [\"LibreHealthEHR\"]\naffinity = {}\n[[instances]]\naddr = \"10.0.0.1:80\"\n[[instances]]\naddr = \"10.0.0.2:80\"\n",
            "core",
        )
        .unwrap(),
        parse_toml_manifest("name = \"portal\"\nprefixes = [\"/patient_portal\"]\n[[instances]]\naddr = \"10.0.1.1:80\"\n", "portal").unwrap(),
    ];
    for i in 0..extra {
        let mut m = parse_toml_manifest(
            &format!("name = \"m{i}\"\nprefixes = [\"/modules/m{i}\"]\n"),
            "m",
        )
        .unwrap();
        m.instances.push(InstanceSpec {
            id: InstanceId(Arc::from(format!("m{i}-a"))),
            addr: format!("10.1.{}.{}:80", i / 250, i % 250 + 1)
                .parse()
                .unwrap(),
            weight: 1,
            draining: false,
        });
        modules.push(m);
    }
    modules
}

fn bench(c: &mut Criterion) {
    let keys = AffinityKeys::generated();
    let states = InstanceStates::new();
    let table = RouteTable::compile(&ehr_modules(50), &states, &keys, "bench").unwrap();
    c.bench_function(
        "lookup /interface/main/tabs/main.php (core, 52 modules)",
        |b| {
            b.iter(|| {
                black_box(
                    table
                        .lookup(
                            black_box("ehr.example.org"),
                            black_box("/interface/main/tabs/main.php"),
                        )
                        .is_some(),
                )
            })
        },
    );
    c.bench_function("lookup /patient_portal/home.php", |b| {
        b.iter(|| {
            black_box(
                table
                    .lookup("ehr.example.org", black_box("/patient_portal/home.php"))
                    .is_some(),
            )
        })
    });
    let core = table.module("core").unwrap();
    let aff = core.affinity.as_ref().unwrap();
    let cookie = aff.cookie_values[1].clone();
    c.bench_function("verify routing cookie", |b| {
        b.iter(|| black_box(aff.verify(black_box(&cookie))))
    });
    c.bench_function("compile 52 modules", |b| {
        let modules = ehr_modules(50);
        b.iter(|| black_box(RouteTable::compile(&modules, &states, &keys, "bench").unwrap()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
