//! `space demo`: SPACE on an embedded configuration in front of built-in sample backends
//! that behave like a LibreEHR core (cookie `LibreHealthEHR`, two instances), a patient
//! portal (`PHPSESSID`) and one module. Files go to a demo directory so an operator can
//! read them: `space.toml`, `modules.d/` (the bundled manifests) and `certs/`.
use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context;
use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora_core::{
    apps::http_app::ServeHttp, protocols::http::ServerSession, services::listening::Service,
};

use crate::server::ExtraServices;

/// Where the demo listens.
pub struct DemoOptions {
    pub dir: PathBuf,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
}

/// One sample backend instance. Instances of one module share a session store, as PHP
/// behind a shared session handler would.
struct SampleBackend {
    module: &'static str,
    instance: String,
    cookie: &'static str,
    sessions: Arc<Mutex<HashMap<String, u64>>>,
}

#[async_trait]
impl ServeHttp for SampleBackend {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let existing = req
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|p| {
                let (k, v) = p.trim().split_once('=')?;
                (k == self.cookie).then(|| v.to_string())
            });
        let (sid, fresh) = match existing {
            Some(s) => (s, false),
            None => (format!("{:032x}", rand::random::<u128>()), true),
        };
        let count = {
            let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let c = map.entry(sid.clone()).or_insert(0);
            *c += 1;
            *c
        };
        let h = |name: &str| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let body = format!(
            "<!doctype html><title>SPACE demo: {module}</title>\n<h1>{module}</h1>\n<ul>\n<li>answered by instance <b>{instance}</b></li>\n<li>path: {path}</li>\n<li>session cookie {cookie}: request {count} of this session</li>\n<li>X-Forwarded-For: {xff}</li>\n<li>X-Forwarded-Proto: {proto}</li>\n<li>X-Request-Id: {rid}</li>\n</ul>\n<p>Try <a href=\"/\">/</a>, <a href=\"/patient_portal/\">/patient_portal/</a>, <a href=\"/modules/labs/\">/modules/labs/</a>, and a denied path: <a href=\"/sites/default/documents/secret.pdf\">/sites/default/documents/secret.pdf</a></p>\n",
            module = self.module,
            instance = self.instance,
            path = html_escape(req.uri.path()),
            cookie = self.cookie,
            xff = html_escape(&h("x-forwarded-for")),
            proto = html_escape(&h("x-forwarded-proto")),
            rid = html_escape(&h("x-request-id")),
        );
        let mut resp = Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .header(header::CONTENT_LENGTH, body.len())
            .header("x-demo-instance", self.instance.as_str());
        if fresh {
            resp = resp.header(header::SET_COOKIE, format!("{}={sid}; Path=/", self.cookie));
        }
        resp.body(body.into_bytes()).expect("valid demo response")
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Writes the demo files and returns the configuration path plus the sample backends.
pub fn prepare(opts: &DemoOptions) -> anyhow::Result<(PathBuf, ExtraServices, String)> {
    let dir = &opts.dir;
    let modules_dir = dir.join("modules.d");
    std::fs::create_dir_all(&modules_dir)
        .with_context(|| format!("creating {}", modules_dir.display()))?;
    std::fs::create_dir_all(dir.join("certs"))?;

    let mut services: ExtraServices = Vec::new();
    let mut instances: HashMap<&str, Vec<(String, u16)>> = HashMap::new();
    for (module, cookie, count) in [
        ("librehealth-core", "LibreHealthEHR", 2),
        ("patient-portal", "PHPSESSID", 1),
        ("labs", "LibreHealthEHR", 1),
    ] {
        let sessions = Arc::new(Mutex::new(HashMap::new()));
        for n in 0..count {
            let port = free_port()?;
            let instance = format!("{module}-{}", (b'a' + n) as char);
            let mut svc = Service::new(
                format!("demo backend {instance}"),
                SampleBackend {
                    module,
                    instance: instance.clone(),
                    cookie,
                    sessions: sessions.clone(),
                },
            );
            svc.threads = Some(1);
            svc.add_tcp(&format!("127.0.0.1:{port}"));
            services.push(Box::new(svc));
            instances.entry(module).or_default().push((instance, port));
        }
    }

    // The bundled manifests, with the demo's instances appended.
    for m in space_modules::BUNDLED {
        let spec = space_modules::parse_toml_manifest(m.text, m.file)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut text = m.text.to_string();
        for (id, port) in instances.get(spec.name.as_str()).into_iter().flatten() {
            text.push_str(&format!(
                "\n[[instances]]\nid = \"{id}\"\naddr = \"127.0.0.1:{port}\"\n"
            ));
        }
        write_file(&modules_dir.join(m.file), &text)?;
    }
    let config = format!(
        r#"# SPACE demo configuration, written by `space demo`. Edit it (or a file in modules.d/)
# while the demo runs: SPACE reloads it; an invalid change is refused and logged.
[server]
threads = 2
grace_period = "5s"

[listeners]
http = "{http}"
https = "{https}"
admin = "{admin}"

[tls]
cert_dir = "certs"
generate_dev_cert = true
hsts_max_age = "1h"

[discovery]
manifests_dir = "modules.d"
"#,
        http = opts.http,
        https = opts.https,
        admin = opts.admin,
    );
    let path = dir.join("space.toml");
    write_file(&path, &config)?;

    let host = |a: SocketAddr| {
        if a.ip().is_unspecified() {
            format!("localhost:{}", a.port())
        } else {
            a.to_string()
        }
    };
    let banner = format!(
        "\nSPACE demo is running. Files: {dir}\n\
         \n  EHR core (2 instances):   http://{http}/\
         \n  patient portal:           http://{http}/patient_portal/\
         \n  example module:           http://{http}/modules/labs/\
         \n  denied at the edge (404): http://{http}/sites/default/documents/secret.pdf\
         \n  HTTPS (dev certificate):  https://{https}/   (curl -k)\
         \n  admin:                    http://{admin}/api/routes  /api/instances  /metrics\
         \n\nStop with Ctrl-C.\n",
        dir = dir.display(),
        http = host(opts.http),
        https = host(opts.https),
        admin = host(opts.admin),
    );
    Ok((path, services, banner))
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
