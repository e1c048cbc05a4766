//! A restarted daemon's filesystem: the inode table a previous daemon served, rebuilt from its
//! journal, so the kernel's (and running containers') inode numbers keep meaning the same nodes.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::context::StoreContext;
use super::fs::{decode_ref, StoreFs};
use super::inodes::Special;
use super::journal::Record;
use super::layers::Layer;
use crate::report::Chain;

impl StoreFs {
    /// The filesystem a previous daemon served, rebuilt from its journal: the same inode
    /// numbers for the same nodes. Layers are rebuilt from local state (artifact store, cache)
    /// when possible; one that cannot be is logged and its numbers answer ENOENT.
    pub fn restore(ctx: Arc<StoreContext>, records: &[Record]) -> Self {
        let fs = StoreFs::new(ctx.clone());
        let mut refs: HashMap<u64, String> = HashMap::new();
        let mut layers: HashMap<u64, Arc<Layer>> = HashMap::new();
        let mut next = 2u64;
        let mut backing: HashMap<u64, u32> = HashMap::new();
        let mut st = fs.write_state();
        for r in records {
            match r {
                Record::Mount { .. } => {}
                Record::RefDir { ino, name } => {
                    next = next.max(ino + 1);
                    let Some(reference) = decode_ref(name.as_bytes()) else {
                        continue;
                    };
                    refs.insert(*ino, reference.clone());
                    st.ref_dirs.insert(name.as_bytes().to_vec(), *ino);
                    st.specials.insert(*ino, Special::RefDir { reference });
                }
                Record::Layer(rec) => {
                    next = next.max(rec.ino + 3 + rec.nodes);
                    let c = ctx.clone();
                    let fut = async move {
                        tokio::time::timeout(c.lookup_timeout, c.restore_layer(rec)).await
                    };
                    match ctx.runtime.block_on(fut) {
                        Ok(Ok(layer)) => {
                            fs.install(&mut st, rec.ino, &layer);
                            layers.insert(rec.ino, layer);
                        }
                        Ok(Err(e)) => {
                            tracing::error!(blob = %rec.blob, "cannot restore: {}", Chain(&*e))
                        }
                        Err(_) => tracing::error!(blob = %rec.blob, "restoring timed out"),
                    }
                }
                Record::LayerDir { parent, name, ino } => {
                    if let (Some(layer), Some(reference)) = (layers.get(ino), refs.get(parent)) {
                        st.layer_dirs
                            .insert((*parent, name.as_bytes().to_vec()), *ino);
                        ctx.remember_layer(reference, name, layer.clone());
                    }
                }
                Record::Backing { ino, id } => {
                    backing.insert(*ino, *id);
                }
                Record::Unbacked { ino } => {
                    backing.remove(ino);
                }
                Record::Uses { ino, uses } => {
                    if let Some(layer) = layers.get(ino) {
                        layer.uses.store(*uses, Ordering::SeqCst);
                    }
                }
            }
        }
        drop(st);
        // Backing IDs still open belong to files a container holds open through the restart.
        fs.open_files.adopt(backing);
        fs.next_ino.store(next, Ordering::SeqCst);
        tracing::info!(layers = layers.len(), next_inode = next, "restored");
        fs
    }
}
