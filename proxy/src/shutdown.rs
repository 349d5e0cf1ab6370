//! SIGTERM: stop accepting, let requests in flight finish within the grace period, exit 0.
//! SIGINT: exit at once.
//!
//! Pingora's graceful terminate stops the listeners and then sleeps the whole grace period;
//! SPACE exits as soon as no request is in flight, so a deploy does not wait 30 s for nothing.
use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use pingora_core::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::service::ProxyState;

pub struct SpaceSignals {
    pub state: Arc<ProxyState>,
    pub grace: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for SpaceSignals {
    async fn recv(&self) -> ShutdownSignal {
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
        tokio::select! {
            _ = term.recv() => {
                tracing::info!(grace = ?self.grace, in_flight = self.state.in_flight.load(Ordering::Relaxed),
                    "SIGTERM: no longer accepting connections; waiting for requests in flight");
                self.state.shutting_down.store(true, Ordering::Relaxed);
                let state = self.state.clone();
                let grace = self.grace;
                std::thread::spawn(move || exit_when_idle(&state, grace));
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: exiting now");
                ShutdownSignal::FastShutdown
            }
        }
    }
}

/// Exits 0 once no request has been in flight for two consecutive looks, or when the grace
/// period is over (Pingora's own shutdown then ends the rest).
fn exit_when_idle(state: &ProxyState, grace: Duration) {
    let deadline = Instant::now() + grace;
    let mut idle_looks = 0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        if state.in_flight.load(Ordering::Acquire) == 0 {
            idle_looks += 1;
            if idle_looks >= 2 {
                tracing::info!("no request in flight: exiting");
                std::process::exit(0);
            }
        } else {
            idle_looks = 0;
        }
    }
    tracing::warn!(
        in_flight = state.in_flight.load(Ordering::Relaxed),
        "grace period over: exiting with requests still in flight"
    );
    std::process::exit(0);
}
