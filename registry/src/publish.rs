//! Publication of route tables: one `ArcSwap`, swapped whole, read once per request.
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::RouteTable;

/// The current route table, shared by the request path, the admin API and the providers.
#[derive(Debug)]
pub struct RouteTableHandle {
    current: ArcSwap<RouteTable>,
}

impl RouteTableHandle {
    pub fn new(table: RouteTable) -> Arc<Self> {
        Arc::new(RouteTableHandle {
            current: ArcSwap::from_pointee(table),
        })
    }

    /// The table to use for one request (a cheap reference-counted snapshot).
    #[inline]
    pub fn load(&self) -> Arc<RouteTable> {
        self.current.load_full()
    }

    /// Replaces the table; requests already holding the old one finish on it.
    pub fn publish(&self, table: RouteTable) {
        self.current.store(Arc::new(table));
    }
}
