//! Where the scanner finds things in kernel structures, from the running kernel's BTF.
use anyhow::Result;
use btf_rs::Btf;

use crate::btf::{Field, find_struct, member};

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
        let cache_bytes = [name.as_ref().ok(), random.as_ref()]
            .into_iter()
            .flatten()
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
    }
}
