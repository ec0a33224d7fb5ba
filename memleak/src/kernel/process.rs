//! A user-space process as /proc shows it: its mapped files, and which of them hold the heap
//! allocator memleak's uprobes attach to.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use object::read::elf::{ElfFile64, ProgramHeader as _};

/// One file-backed mapping of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of the mapping's first byte.
    pub file_offset: u64,
    pub executable: bool,
    pub path: PathBuf,
}

/// A process's file-backed mappings at one moment: enough to turn its code addresses into
/// file offsets after it has exited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessMaps {
    pub mappings: Vec<Mapping>,
}

impl ProcessMaps {
    pub fn read(pid: u32) -> Result<Self> {
        let path = format!("/proc/{pid}/maps");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Ok(Self::parse(&text))
    }

    /// Parses `/proc/PID/maps`; anonymous and special mappings (`[heap]`, `[vdso]`) and
    /// malformed lines are left out.
    pub fn parse(text: &str) -> Self {
        let mappings = text.lines().filter_map(parse_line).collect();
        Self { mappings }
    }

    /// The mapped file holding `address`, and its offset in that file (`None` also where a
    /// malformed offset would not fit in 64 bits).
    pub fn file_offset(&self, address: u64) -> Option<(&Path, u64)> {
        let mapping = self
            .mappings
            .iter()
            .find(|mapping| (mapping.start..mapping.end).contains(&address))?;
        let offset = (address - mapping.start).checked_add(mapping.file_offset)?;
        Some((mapping.path.as_path(), offset))
    }

    /// The files mapped executable, each once, in address order.
    pub fn executable_files(&self) -> Vec<&Path> {
        let mut files: Vec<&Path> = Vec::new();
        for mapping in self.mappings.iter().filter(|mapping| mapping.executable) {
            if !files.contains(&mapping.path.as_path()) {
                files.push(&mapping.path);
            }
        }
        files
    }
}

/// `start-end perms offset dev inode path`, with a path that may hold spaces.
fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    let file_offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let _device = fields.next()?;
    let inode: u64 = fields.next()?.parse().ok()?;
    let path = fields.next()?.trim_start();
    if inode == 0 || !path.starts_with('/') {
        return None;
    }
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        file_offset,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        // A file replaced or removed since it was mapped: symbols come from the path as it
        // is now, which may be another file, or none.
        path: PathBuf::from(path.strip_suffix(" (deleted)").unwrap_or(path)),
    })
}

/// Directories the dynamic loader searches by default on Debian and Fedora-like systems,
/// for the C library a command about to start will load.
const LIBRARY_DIRS: [&str; 6] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// The first of the standard library directories holding `name`.
pub fn find_library(name: &str) -> Option<PathBuf> {
    LIBRARY_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}

/// The shared libraries the dynamic loader maps for `program` before its first instruction: its
/// needed libraries, theirs, and LD_PRELOAD's, found as the loader finds them in this
/// environment (RUNPATH, `$ORIGIN`, LD_LIBRARY_PATH, ld.so.cache). It asks the program's own
/// loader (`INTERPRETER --list PROGRAM`, what ldd runs), which maps them without running their
/// code. Empty for a static program.
pub fn linked_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let data = fs::read(program).with_context(|| format!("reading {}", program.display()))?;
    let Some(interpreter) = interpreter(&data)
        .with_context(|| format!("{}: not an ELF program memleak can read", program.display()))?
    else {
        return Ok(Vec::new());
    };
    let output = Command::new(&interpreter)
        .arg("--list")
        .arg(program)
        .output()
        .with_context(|| format!("running {} --list", interpreter.display()))?;
    let libraries = parse_loader_list(&String::from_utf8_lossy(&output.stdout));
    if libraries.is_empty() {
        bail!(
            "{} --list {} named no library ({}): {}",
            interpreter.display(),
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(libraries)
}

/// The program interpreter (PT_INTERP) of a 64-bit ELF file, `None` for a static one.
fn interpreter(data: &[u8]) -> Result<Option<PathBuf>> {
    let elf = ElfFile64::<object::Endianness>::parse(data)?;
    for header in elf.elf_program_headers() {
        if let Some(path) = header.interpreter(elf.endian(), data)? {
            let path = path.strip_suffix(b"\0").unwrap_or(path);
            return Ok(Some(PathBuf::from(
                String::from_utf8_lossy(path).into_owned(),
            )));
        }
    }
    Ok(None)
}

/// The libraries of the loader's `--list` output: `NAME => PATH (0x...)` for a needed library,
/// `PATH (0x...)` for a preloaded one or the loader itself; the vDSO and libraries `not found`
/// are left out.
fn parse_loader_list(text: &str) -> Vec<PathBuf> {
    let mut libraries: Vec<PathBuf> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let entry = line.split_once(" => ").map_or(line, |(_, path)| path);
        let path = entry
            .rsplit_once(" (0x")
            .map_or(entry, |(path, _)| path)
            .trim();
        if path.starts_with('/') && !libraries.iter().any(|known| known == Path::new(path)) {
            libraries.push(PathBuf::from(path));
        }
    }
    libraries
}

/// The path of `program` as `execvp` would find it.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loaders_list_gives_each_library_path_once() {
        // `ld-linux-x86-64.so.2 --list` on Debian 12, for a program linking jemalloc and a
        // library of its own, with mimalloc preloaded and one library missing.
        let listed = "\
\tlinux-vdso.so.1 (0x00007f5a9297e000)
\t/usr/lib/x86_64-linux-gnu/libmimalloc.so.2 (0x00007f5a9290f000)
\tlibleaky user.so => /tmp/alloc test/libleaky user.so (0x00007f5a9290a000)
\tlibjemalloc.so.2 => /lib/x86_64-linux-gnu/libjemalloc.so.2 (0x00007f5a04a00000)
\tlibgone.so.1 => not found
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f5a9271e000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f5a9271e000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f5a92980000)
";
        assert_eq!(
            parse_loader_list(listed),
            [
                "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2",
                "/tmp/alloc test/libleaky user.so",
                "/lib/x86_64-linux-gnu/libjemalloc.so.2",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
            ]
            .map(PathBuf::from)
        );
        assert!(parse_loader_list("\tstatically linked\n").is_empty());
    }

    #[test]
    fn a_dynamic_program_names_its_loader_and_a_static_one_none() {
        // This test binary is dynamically linked (glibc); the ELF header of a static program
        // is the same without PT_INTERP.
        let this = fs::read(std::env::current_exe().unwrap()).unwrap();
        let loader = interpreter(&this).unwrap().expect("a dynamic test binary");
        assert!(loader.is_absolute() && loader.is_file(), "{loader:?}");
        let libraries = linked_libraries(&std::env::current_exe().unwrap()).unwrap();
        assert!(
            libraries
                .iter()
                .any(|library| library.file_name().is_some_and(|name| name == "libc.so.6")),
            "{libraries:?}"
        );
        assert!(interpreter(b"not an ELF file").is_err());
    }

    /// Recorded from a Debian 12 process running a PIE with a shared library (trimmed).
    const MAPS: &str = "\
5581e3a00000-5581e3a01000 r--p 00000000 fe:01 1311372                    /tmp/leaky user
5581e3a01000-5581e3a02000 r-xp 00001000 fe:01 1311372                    /tmp/leaky user
5581e3a04000-5581e3a05000 rw-p 00003000 fe:01 1311372                    /tmp/leaky user
5581e4f2e000-5581e4f4f000 rw-p 00000000 00:00 0                          [heap]
7f3c2a200000-7f3c2a226000 r--p 00000000 fe:01 2359434                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f3c2a226000-7f3c2a37b000 r-xp 00026000 fe:01 2359434                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f3c2a5e0000-7f3c2a5e1000 r-xp 00001000 fe:01 1311380                    /tmp/libgone.so (deleted)
7ffd5c9e5000-7ffd5c9e7000 r-xp 00000000 00:00 0                          [vdso]
garbage line
";

    #[test]
    fn keeps_file_mappings_with_their_offsets() {
        let maps = ProcessMaps::parse(MAPS);
        assert_eq!(maps.mappings.len(), 6);
        assert_eq!(
            maps.file_offset(0x5581_e3a0_1234),
            Some((Path::new("/tmp/leaky user"), 0x1234))
        );
        assert_eq!(
            maps.file_offset(0x7f3c_2a22_6010),
            Some((Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6"), 0x26010))
        );
        assert_eq!(maps.file_offset(0x5581_e4f2_e100), None, "heap");
        assert_eq!(maps.file_offset(0x7ffd_5c9e_5100), None, "vdso");
    }

    #[test]
    fn lists_each_executable_file_once() {
        let maps = ProcessMaps::parse(MAPS);
        assert_eq!(
            maps.executable_files(),
            vec![
                Path::new("/tmp/leaky user"),
                Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6"),
                Path::new("/tmp/libgone.so"),
            ]
        );
    }
}
