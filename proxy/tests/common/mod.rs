//! Starting the real `space` binary with a generated configuration and certificates.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use test_support::{free_addr, SpaceProcess, TempDir, TestPki};

pub const SPACE: &str = env!("CARGO_BIN_EXE_space");

/// A running `space` with its files.
pub struct Space {
    pub process: SpaceProcess,
    pub dir: TempDir,
    pub pki: TestPki,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub extra: String,
}

/// The `[server]`/`[listeners]`/`[tls]` head of a test configuration.
pub fn head(http: SocketAddr, https: SocketAddr, admin: SocketAddr, extra: &str) -> String {
    format!(
        r#"[server]
threads = 2
grace_period = "10s"
{extra}

[listeners]
http = "{http}"
https = "{https}"
admin = "{admin}"

[tls]
cert_dir = "certs"
default_cert = "default"
"#
    )
}

impl Space {
    /// Starts SPACE with `modules` (TOML `[[module]]` tables) and a certificate for
    /// `localhost`/`127.0.0.1` named `default`.
    pub fn start(modules: &str) -> Space {
        Self::start_with(modules, "")
    }

    /// Like [`Space::start`], with extra `[server]` keys.
    pub fn start_with(modules: &str, server_extra: &str) -> Space {
        let dir = test_support::temp_dir();
        let pki = TestPki::new();
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        pki.write_pair(
            &dir.path().join("certs"),
            "default",
            &["localhost", "127.0.0.1"],
        );
        let (http, https, admin) = (free_addr(), free_addr(), free_addr());
        let config_path = dir.path().join("space.toml");
        std::fs::write(
            &config_path,
            format!("{}\n{modules}", head(http, https, admin, server_extra)),
        )
        .unwrap();
        let mut process =
            SpaceProcess::spawn(SPACE, ["run", "--config", config_path.to_str().unwrap()]);
        process.wait_ready(admin);
        Space {
            process,
            dir,
            pki,
            http,
            https,
            admin,
            config_path,
            extra: server_extra.to_string(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https.port())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Rewrites the configuration with new modules (atomically, as editors and
    /// ConfigMap updates do).
    pub fn rewrite_modules(&self, modules: &str) {
        let text = format!(
            "{}\n{modules}",
            head(self.http, self.https, self.admin, &self.extra)
        );
        write_atomically(&self.config_path, &text);
    }

    pub fn write_raw_config(&self, text: &str) {
        write_atomically(&self.config_path, text);
    }

    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// The revision of the route table in use, from the admin API.
    pub async fn revision(&self) -> String {
        let (_, v) = test_support::http::get_json(&self.admin_url("/api/routes")).await;
        v["revision"].as_str().unwrap_or_default().to_string()
    }

    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// The Prometheus text from the admin listener.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The admin API's view of one instance (by id).
    pub async fn instance(&self, id: &str) -> serde_json::Value {
        let (_, v) = test_support::http::get_json(&self.admin_url("/api/instances")).await;
        v["instances"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["id"] == id).cloned())
            .unwrap_or_default()
    }
}

pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A `[[module]]` table with instances at `addrs`.
pub fn module(name: &str, prefixes: &[&str], addrs: &[SocketAddr], extra: &str) -> String {
    let prefixes: Vec<String> = prefixes.iter().map(|p| format!("\"{p}\"")).collect();
    let mut s = format!(
        "[[module]]\nname = \"{name}\"\nprefixes = [{}]\n{extra}\n",
        prefixes.join(", ")
    );
    for a in addrs {
        s.push_str(&format!(
            "[[module.instances]]\nid = \"{a}\"\naddr = \"{a}\"\n"
        ));
    }
    s
}

/// Health checks every 100 ms, one pass or failure flips state.
pub const FAST_HEALTH: &str =
    "health_check = { interval = \"100ms\", timeout = \"1s\", rise = 1, fall = 1 }";
pub const NO_HEALTH: &str = "health_check = { enabled = false }";

pub fn client() -> reqwest::Client {
    test_support::http::client()
}

/// GETs `url` and returns (status, instance name from the echo backend's JSON).
pub async fn get_instance(client: &reqwest::Client, url: &str) -> (u16, String) {
    match client.get(url).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            (status, v["instance"].as_str().unwrap_or("").to_string())
        }
        Err(e) => (0, format!("error: {e}")),
    }
}

pub const LONG: Duration = Duration::from_secs(20);
