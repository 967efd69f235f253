//! `Health`: whether the server can take work, as the standard
//! `grpc.health.v1` service tells gRPC clients (`grpc_health_probe`,
//! Kubernetes' gRPC probes, load balancers) and the metrics port's
//! `/readyz` tells HTTP ones. SERVING while the server can record results
//! (journal and results file writable); NOT_SERVING once it drains at
//! shutdown or stops after a disk error. The overall status ("") and each
//! service's (`Contact`, `contact.admin.v1.Admin`) move together.

use grpcio_health::{HealthService, ServingStatus};
use std::sync::atomic::{AtomicBool, Ordering};

/// The services whose status is reported: the server as a whole, then each.
const SERVICES: [&str; 3] = ["", "Contact", "contact.admin.v1.Admin"];

/// The server's health, shared by the gRPC health service and `/readyz`.
pub struct Health {
    service: HealthService,
    serving: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    /// NOT_SERVING until [`Health::set_serving`].
    pub fn new() -> Health {
        let h = Health {
            service: HealthService::default(),
            serving: AtomicBool::new(true),
        };
        h.set_serving(false);
        h
    }

    /// The `grpc.health.v1.Health` service to register on the server.
    pub fn grpc_service(&self) -> grpcio::Service {
        grpcio_health::create_health(self.service.clone())
    }

    /// Reports SERVING (`true`) or NOT_SERVING; a change is logged.
    pub fn set_serving(&self, serving: bool) {
        if self.serving.swap(serving, Ordering::SeqCst) == serving {
            return;
        }
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for s in SERVICES {
            self.service.set_serving_status(s, status);
        }
        log::debug!(
            "health: {}",
            if serving { "SERVING" } else { "NOT_SERVING" }
        );
    }

    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }
}
