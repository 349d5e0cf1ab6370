//! Active health checks: an HTTP GET to each instance of each module that enables them, on
//! the module's interval. The checker follows the current route table, so instances added
//! by a reload are checked within one tick (100 ms), and a new instance takes traffic only
//! after its first passing check.
use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use pingora_core::{server::ShutdownWatch, services::background::BackgroundService};
use space_modules::HealthCheckSpec;
use space_registry::{CompiledInstance, Health, RouteTableHandle};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// How often the checker looks for due checks.
const TICK: Duration = Duration::from_millis(100);

pub struct HealthChecker {
    pub routes: Arc<RouteTableHandle>,
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            let table = self.routes.load();
            for module in table.modules() {
                let spec = &module.spec.health_check;
                if !spec.enabled {
                    continue;
                }
                for instance in &module.instances {
                    if instance.state.claim_check(spec.interval) {
                        let instance = instance.clone();
                        let spec = spec.clone();
                        let module_name = module.spec.name.clone();
                        tokio::spawn(async move {
                            let result = check(&instance, &spec).await;
                            let passed = result.is_ok();
                            if let Some(change) =
                                instance.state.record_check(passed, spec.rise, spec.fall)
                            {
                                match (change, result) {
                                    (Health::Up, _) => {
                                        tracing::info!(module = %module_name, instance = %instance.spec.id, addr = %instance.spec.addr, "instance is up")
                                    }
                                    (_, Err(why)) => {
                                        tracing::warn!(module = %module_name, instance = %instance.spec.id, addr = %instance.spec.addr, reason = %why, "instance is down")
                                    }
                                    _ => {}
                                }
                            }
                            instance.state.check_done();
                        });
                    }
                }
            }
        }
    }
}

/// One check: connect, `GET path`, read the status line; pass if the status is expected.
pub async fn check(instance: &CompiledInstance, spec: &HealthCheckSpec) -> Result<u16, String> {
    let addr = instance.spec.addr;
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let host = spec.host.clone().unwrap_or_else(|| addr.to_string());
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: space-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            spec.path
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 256];
        let mut filled = 0;
        while filled < 12 {
            let n = stream
                .read(&mut buf[filled..])
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed before a status line".to_string());
            }
            filled += n;
        }
        let line = std::str::from_utf8(&buf[..filled]).unwrap_or("");
        let status: u16 = line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| "no HTTP status line".to_string())?;
        if spec.expect_status.contains(status) {
            Ok(status)
        } else {
            Err(format!("status {status}, expected {}", spec.expect_status))
        }
    };
    match tokio::time::timeout(spec.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", spec.timeout)),
    }
}
