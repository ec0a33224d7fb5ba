//! Where the scanner finds things in kernel structures, from the running kernel's BTF.
use anyhow::{Context as _, Result, anyhow, bail};
use btf_rs::{Btf, Type};

/// A field's position: byte offset, and for bit fields the bit offset and width inside the
/// 32-bit word at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: usize,
    pub bit_shift: u32,
    pub bits: u32,
}

impl Field {
    fn bytes(offset: usize) -> Self {
        Self {
            offset,
            bit_shift: 0,
            bits: 64,
        }
    }

    /// The field's value in `bytes` (a copy of the structure), or `None` when it is out of range.
    pub fn read(&self, bytes: &[u8]) -> Option<u64> {
        if self.bits == 64 {
            let word = bytes.get(self.offset..self.offset + 8)?;
            return Some(u64::from_le_bytes(word.try_into().ok()?));
        }
        let word = bytes.get(self.offset..self.offset + 4)?;
        let word = u32::from_le_bytes(word.try_into().ok()?);
        Some(u64::from(
            (word >> self.bit_shift) & ((1u32 << self.bits) - 1),
        ))
    }

    pub fn read_u32(&self, bytes: &[u8]) -> Option<u32> {
        let word = bytes.get(self.offset..self.offset + 4)?;
        Some(u32::from_le_bytes(word.try_into().ok()?))
    }
}

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

fn find_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct> {
    btf.resolve_types_by_name(name)
        .with_context(|| format!("looking up struct {name} in kernel BTF"))?
        .into_iter()
        .find_map(|candidate| match candidate {
            Type::Struct(structure) if !structure.members.is_empty() => Some(structure),
            _ => None,
        })
        .ok_or_else(|| anyhow!("kernel BTF has no definition of struct {name}"))
}

/// Finds member `wanted` of `structure`, looking inside anonymous unions and structs.
fn member(btf: &Btf, structure: &btf_rs::Struct, wanted: &str) -> Result<Field> {
    find_member(btf, structure, wanted, 0)?
        .ok_or_else(|| anyhow!("kernel BTF: no member `{wanted}` where memleak expects it"))
}

fn find_member(
    btf: &Btf,
    structure: &btf_rs::Struct,
    wanted: &str,
    base_bits: u32,
) -> Result<Option<Field>> {
    for member in &structure.members {
        let bits = base_bits + member.bit_offset();
        let name = btf.resolve_name(member).unwrap_or_default();
        if name == wanted {
            return Ok(Some(match member.bitfield_size() {
                Some(width) if width > 0 => Field {
                    offset: (bits / 32 * 4) as usize,
                    bit_shift: bits % 32,
                    bits: width,
                },
                _ if !bits.is_multiple_of(8) => bail!("member `{wanted}` is not byte aligned"),
                _ => Field::bytes((bits / 8) as usize),
            }));
        }
        if name.is_empty() {
            let inner = match btf.resolve_chained_type(member) {
                Ok(Type::Struct(inner) | Type::Union(inner)) => inner,
                _ => continue,
            };
            if let Some(found) = find_member(btf, &inner, wanted, bits)? {
                return Ok(Some(found));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel;

    #[test]
    fn reads_bit_fields_and_words() {
        let objects = Field {
            offset: 4,
            bit_shift: 16,
            bits: 15,
        };
        let mut bytes = [0u8; 16];
        bytes[4..8].copy_from_slice(&(0x8000_0000u32 | 21 << 16 | 7).to_le_bytes());
        assert_eq!(objects.read(&bytes), Some(21));
        bytes[8..16].copy_from_slice(&0xffff_8880_1234_5678u64.to_le_bytes());
        assert_eq!(Field::bytes(8).read(&bytes), Some(0xffff_8880_1234_5678));
        assert_eq!(Field::bytes(12).read(&bytes), None);
    }

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
