//! Where the scanner finds things in kernel structures, from the running kernel's BTF.
use anyhow::Result;
use btf_rs::Btf;

use crate::kernel::btf::{Field, find_struct, member};

/// The fields of `struct slab`, `struct kmem_cache`, `struct page` and `struct task_struct`
/// the scanner reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlabLayout {
    /// `sizeof(struct page)`: the stride of the vmemmap array (`struct slab` overlays it).
    pub page_size: usize,
    pub slab_cache: Field,
    pub slab_freelist: Field,
    pub slab_inuse: Field,
    pub slab_objects: Field,
    pub cache_size: Field,
    pub cache_object_size: Field,
    pub cache_offset: Field,
    pub cache_red_left_pad: Field,
    pub cache_name: Field,
    /// `kmem_cache::random`, the freelist pointer obfuscation key; `None` without
    /// CONFIG_SLAB_FREELIST_HARDENED.
    pub cache_random: Option<Field>,
    /// Bytes of `struct kmem_cache` the scanner reads: up to and including its last field.
    pub cache_bytes: usize,
    /// `task_struct::task_frag.page`: the page TCP sends of the task copy their data into.
    pub task_frag_page: Field,
    /// `task_struct::task_frag.offset`: where the next send's data goes in that page.
    pub task_frag_offset: Field,
    /// Where SLUB keeps free objects outside their slab's own freelist; `None` on a kernel
    /// whose structures memleak does not know.
    pub free_lists: Option<FreeListLayout>,
}

/// The structures the liveness check walks besides `struct slab`'s freelist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeListLayout {
    /// `struct slab::frozen`: the slab is some CPU's slab, whose free objects are on that CPU's
    /// lockless freelist rather than the slab's.
    pub slab_frozen: Field,
    /// `kmem_cache::cpu_slab`, a per-CPU `struct kmem_cache_cpu *`.
    pub cache_cpu_slab: Field,
    pub cpu_freelist: Field,
    pub cpu_slab: Field,
    /// `kmem_cache::node[]`, the per-node `struct kmem_cache_node *` array.
    pub cache_node: Field,
    /// `offsetof(struct bpf_array, pptrs)`, to find the per-CPU offsets.
    pub bpf_array_pptrs: Field,
    /// Linux 6.18+: per-CPU sheaves and per-node barns of freed objects.
    pub sheaves: Option<SheafLayout>,
}

/// Slab sheaves (Linux 6.18+): arrays of free objects held per CPU, and full ones in each
/// node's barn, that SLUB hands out before touching a slab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SheafLayout {
    /// `kmem_cache::cpu_sheaves`, a per-CPU `struct slub_percpu_sheaves *` (NULL when the cache
    /// has no sheaves).
    pub cache_cpu_sheaves: Field,
    /// `slub_percpu_sheaves::{main, spare, rcu_free}`.
    pub percpu_sheaves: [Field; 3],
    pub sheaf_size: Field,
    pub sheaf_objects: Field,
    pub sheaf_barn_list: Field,
    pub node_barn: Field,
    pub barn_sheaves_full: Field,
}

impl FreeListLayout {
    fn from_btf(btf: &Btf, slab: &btf_rs::Struct, cache: &btf_rs::Struct) -> Result<Self> {
        let cpu = find_struct(btf, "kmem_cache_cpu")?;
        let array = find_struct(btf, "bpf_array")?;
        let sheaves = (|| -> Result<SheafLayout> {
            let percpu = find_struct(btf, "slub_percpu_sheaves")?;
            let sheaf = find_struct(btf, "slab_sheaf")?;
            let node = find_struct(btf, "kmem_cache_node")?;
            let barn = find_struct(btf, "node_barn")?;
            Ok(SheafLayout {
                cache_cpu_sheaves: member(btf, cache, "cpu_sheaves")?,
                percpu_sheaves: [
                    member(btf, &percpu, "main")?,
                    member(btf, &percpu, "spare")?,
                    member(btf, &percpu, "rcu_free")?,
                ],
                sheaf_size: member(btf, &sheaf, "size")?,
                sheaf_objects: member(btf, &sheaf, "objects")?,
                sheaf_barn_list: member(btf, &sheaf, "barn_list")?,
                node_barn: member(btf, &node, "barn")?,
                barn_sheaves_full: member(btf, &barn, "sheaves_full")?,
            })
        })()
        .ok();
        Ok(Self {
            slab_frozen: member(btf, slab, "frozen")?,
            cache_cpu_slab: member(btf, cache, "cpu_slab")?,
            cpu_freelist: member(btf, &cpu, "freelist")?,
            cpu_slab: member(btf, &cpu, "slab")?,
            cache_node: member(btf, cache, "node")?,
            bpf_array_pptrs: member(btf, &array, "pptrs")?,
            sheaves,
        })
    }
}

impl SlabLayout {
    pub fn from_btf(btf: &Btf) -> Result<Self> {
        let page = find_struct(btf, "page")?;
        let slab = find_struct(btf, "slab")?;
        let cache = find_struct(btf, "kmem_cache")?;
        let task = find_struct(btf, "task_struct")?;
        let frag = find_struct(btf, "page_frag")?;
        let task_frag = member(btf, &task, "task_frag")?.offset;
        let cache_fields = ["size", "object_size", "offset", "red_left_pad", "name"]
            .map(|name| member(btf, &cache, name));
        let [size, object_size, offset, red_left_pad, name] = cache_fields;
        let random = member(btf, &cache, "random").ok();
        let free_lists = FreeListLayout::from_btf(btf, &slab, &cache).ok();
        let cpu_pointers = free_lists.map(|layout| {
            [
                Some(layout.cache_cpu_slab),
                layout.sheaves.map(|sheaves| sheaves.cache_cpu_sheaves),
            ]
        });
        let cache_bytes = [name.as_ref().ok(), random.as_ref()]
            .into_iter()
            .flatten()
            .copied()
            .chain(cpu_pointers.into_iter().flatten().flatten())
            .map(|field| field.offset + 8)
            .max()
            .unwrap_or(0);
        let frag_page = member(btf, &frag, "page")?.offset;
        let frag_offset = member(btf, &frag, "offset")?.offset;
        Ok(Self {
            page_size: page.size(),
            slab_cache: member(btf, &slab, "slab_cache")?,
            slab_freelist: member(btf, &slab, "freelist")?,
            slab_inuse: member(btf, &slab, "inuse")?,
            slab_objects: member(btf, &slab, "objects")?,
            cache_size: size?,
            cache_object_size: object_size?,
            cache_offset: offset?,
            cache_red_left_pad: red_left_pad?,
            cache_name: name?,
            cache_random: random,
            cache_bytes,
            task_frag_page: Field::bytes(task_frag + frag_page),
            task_frag_offset: Field {
                offset: task_frag + frag_offset,
                bit_shift: 0,
                bits: 32,
            },
            free_lists,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel;

    #[test]
    fn finds_slab_layout_in_running_kernel_btf() {
        if !kernel::has_btf() {
            return;
        }
        let btf = Btf::from_file(kernel::BTF_PATH).unwrap();
        let layout = SlabLayout::from_btf(&btf).unwrap();
        // struct slab overlays struct page, so it lies within it.
        assert!(layout.slab_cache.offset + 8 <= layout.page_size);
        assert_eq!(layout.slab_inuse.bits, 16);
        assert_eq!(layout.slab_objects.bits, 15);
        assert_eq!(
            layout.cache_object_size.offset,
            layout.cache_size.offset + 4
        );
        // The liveness check knows this kernel's free lists.
        let free_lists = layout.free_lists.expect("SLUB's free list structures");
        assert_eq!(free_lists.slab_frozen.bits, 1);
    }
}
