//! The mark phase: every metadata object and chunk that the kept snapshots reach, found by
//! walking their trees and file maps from the markers. Each object is read once (a seen
//! set), verified against its name, and decoded by the hostile-input decoders; one that
//! cannot be read or verified fails the walk, and with it the prune, before anything is
//! deleted.

use std::collections::HashSet;

use crate::replica::backend::{Backend, BackendError};
use crate::replica::format::{self, Body, Hash, Marker};
use crate::storage::keys::ChunkId;

#[derive(Default)]
pub struct Reach {
    pub metas: HashSet<Hash>,
    pub chunks: HashSet<ChunkId>,
}

fn damaged(snapshot: &str, what: &str, hash: &Hash, why: impl std::fmt::Display) -> String {
    format!(
        "snapshot {snapshot}: {what} {} {why}; prune deletes nothing while a kept snapshot is \
         damaged (see `snapfs scrub --repair`)",
        format::hex(hash)
    )
}

fn fetch(b: &dyn Backend, snapshot: &str, what: &str, hash: &Hash) -> Result<Vec<u8>, String> {
    b.get(&format::meta_name(hash)).map_err(|e| match e {
        BackendError::NotFound => damaged(snapshot, what, hash, "is missing"),
        e => format!("cannot read {what} {}: {e}", format::hex(hash)),
    })
}

/// Walks `markers`; `tick` is called between objects (the prune's heartbeat).
pub fn walk(
    b: &dyn Backend,
    markers: &[Marker],
    tick: &mut dyn FnMut() -> Result<(), String>,
) -> Result<Reach, String> {
    let mut r = Reach::default();
    for m in markers {
        let mut stack: Vec<Hash> = Vec::new();
        if let Body::Dir(h) = m.root.body {
            stack.push(h);
        }
        while let Some(h) = stack.pop() {
            if !r.metas.insert(h) {
                continue;
            }
            tick()?;
            let obj = fetch(b, &m.name, "tree", &h)?;
            let entries =
                format::open_tree(&h, &obj).map_err(|e| damaged(&m.name, "tree", &h, e))?;
            for e in entries {
                match e.body {
                    Body::Dir(d) => stack.push(d),
                    Body::File(Some(f)) if r.metas.insert(f) => {
                        let obj = fetch(b, &m.name, "file map", &f)?;
                        let items = format::open_map(&f, &obj, m.chunk_size)
                            .map_err(|e| damaged(&m.name, "file map", &f, e))?;
                        r.chunks.extend(items.iter().map(|i| i.id));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(r)
}
