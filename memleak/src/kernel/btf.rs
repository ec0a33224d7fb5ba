//! Finding structures and their members in the running kernel's BTF.
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
    pub fn bytes(offset: usize) -> Self {
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

    /// The byte offset of a field that is not a bit field.
    pub fn byte_offset(&self) -> Option<u32> {
        (self.bits == 64)
            .then_some(u32::try_from(self.offset).ok())
            .flatten()
    }

    pub fn read_u32(&self, bytes: &[u8]) -> Option<u32> {
        let word = bytes.get(self.offset..self.offset + 4)?;
        Some(u32::from_le_bytes(word.try_into().ok()?))
    }
}

pub fn find_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct> {
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
pub fn member(btf: &Btf, structure: &btf_rs::Struct, wanted: &str) -> Result<Field> {
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
}
