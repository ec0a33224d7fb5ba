//! Reads kmemleak reports as the kernel prints them, in every layout it has used (on the
//! right, what older or newer kernels print instead):
//!
//! ```text
//! unreferenced object 0xffff888104a3c000 (size 64):      newer: `object (percpu) 0x...`
//!   comm "insmod", pid 4242, jiffies 4295187350          older: then `(age 12.345s)`
//!   hex dump (first 32 bytes):                           percpu: `... bytes on cpu 2):`
//!     4c 45 41 4b 59 21 00 00 01 00 00 00 00 00 00 00  LEAKY!..........
//!   backtrace (crc 3b5a6a4e):                            older: `backtrace:`
//!     kmemleak_alloc+0x4a/0x80                           older: `[<%p or %pK>] ` first
//!     leaky_alloc+0x1c/0x40 [leaky]
//! ```
//!
//! Reports pasted into tickets come from dmesg or the journal, so log prefixes
//! (`[  302.118725] `, `<4>`, `Nov 23 11:46:00 host kernel: `, `kmemleak: `) and Windows line
//! endings are stripped, and lines that belong to no record are skipped. Nothing here panics
//! on any input: what cannot be read is counted or flagged instead.
use crate::symbols::frame::Frame;

/// One object kmemleak found no reference to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakedObject {
    /// The kernel's label for objects outside the slab/vmalloc space: `percpu` or `phys`.
    pub object_type: Option<String>,
    pub size: u64,
    /// The task that allocated it (`hardirq`/`softirq` with pid 0 in interrupt context).
    pub task: Option<Task>,
    /// Age at report time; newer kernels no longer print it.
    pub age_ms: Option<u64>,
    /// The first bytes of the object (at most 32 in every kernel so far).
    pub hex_dump: Vec<u8>,
    /// The allocation backtrace, innermost first.
    pub frames: Vec<Frame>,
    /// The record was cut short (end of input inside it, hex dump shorter than announced):
    /// the fields above hold what was there.
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub comm: String,
    pub pid: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedReport {
    pub objects: Vec<LeakedObject>,
    /// Records whose `unreferenced object` line could not be read; their bodies are skipped.
    pub unparsed_records: usize,
}

impl ParsedReport {
    pub fn truncated_records(&self) -> usize {
        self.objects
            .iter()
            .filter(|object| object.truncated)
            .count()
    }
}

pub fn parse(text: &str) -> ParsedReport {
    let mut parser = Parser::default();
    for line in text.split_inclusive('\n') {
        parser.feed(line.trim_end_matches('\n'), line.ends_with('\n'));
    }
    parser.finish(true);
    ParsedReport {
        objects: parser.objects,
        unparsed_records: parser.unparsed_records,
    }
}

#[derive(Default)]
struct Parser {
    objects: Vec<LeakedObject>,
    unparsed_records: usize,
    current: Option<Record>,
}

/// A record being read, with where in it we are: each part of a record follows the previous
/// one, so a line is only taken for what may come next.
struct Record {
    object: LeakedObject,
    section: Section,
    hex_announced: usize,
    saw_backtrace: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    /// After the header: the comm line, then a hex dump or a backtrace.
    Details,
    HexDump,
    Backtrace,
}

impl Parser {
    /// `terminated` is false for a last line that the end of input may have cut.
    fn feed(&mut self, line: &str, terminated: bool) {
        let text = strip_log_prefixes(line).trim();
        if let Some(header) = text
            .strip_prefix("unreferenced object")
            .filter(|rest| rest.is_empty() || rest.starts_with(' '))
        {
            self.finish(false);
            match parse_header(header) {
                Some((object_type, size)) => self.current = Some(Record::new(object_type, size)),
                None => self.unparsed_records += 1,
            }
            return;
        }
        let Some(record) = self.current.as_mut() else {
            return;
        };
        if text.is_empty() || record.accept(text) {
            return;
        }
        match record.section {
            // A line cut by the end of input is not trusted, whatever it still looks like.
            Section::HexDump | Section::Backtrace if !terminated => record.object.truncated = true,
            // Kernel messages between reports, or the text of a ticket around them.
            Section::Backtrace if !record.object.frames.is_empty() => self.finish(false),
            // Interleaved messages inside a record, from other CPUs.
            _ => {}
        }
    }

    fn finish(&mut self, end_of_input: bool) {
        if let Some(record) = self.current.take() {
            let mut object = record.object;
            // A backtrace header with no frame after it is legitimate (an object allocated before
            // the stack depot was up) unless the input ends right there.
            let cut_after_backtrace_header = end_of_input && object.frames.is_empty();
            object.truncated |= !record.saw_backtrace
                || cut_after_backtrace_header
                || object.hex_dump.len() < record.hex_announced;
            self.objects.push(object);
        }
    }
}

impl Record {
    fn new(object_type: Option<String>, size: u64) -> Self {
        Self {
            object: LeakedObject {
                object_type,
                size,
                task: None,
                age_ms: None,
                hex_dump: Vec::new(),
                frames: Vec::new(),
                truncated: false,
            },
            section: Section::Details,
            hex_announced: 0,
            saw_backtrace: false,
        }
    }

    /// Takes `text` if it is what may come next in the record.
    fn accept(&mut self, text: &str) -> bool {
        match self.section {
            Section::Details => {
                if self.object.task.is_none()
                    && let Some((task, age_ms)) = text.strip_prefix("comm \"").and_then(parse_task)
                {
                    self.object.task = Some(task);
                    self.object.age_ms = age_ms;
                    true
                } else if let Some(announced) = parse_hex_dump_header(text) {
                    self.hex_announced = announced;
                    self.section = Section::HexDump;
                    true
                } else {
                    self.accept_backtrace_header(text)
                }
            }
            Section::HexDump => {
                if self.object.hex_dump.len() < self.hex_announced
                    && let Some(bytes) = parse_hex_row(text)
                {
                    self.object.hex_dump.extend(bytes);
                    self.object.hex_dump.truncate(self.hex_announced);
                    true
                } else {
                    self.accept_backtrace_header(text)
                }
            }
            Section::Backtrace => match parse_frame(text) {
                Some(frame) => {
                    if !is_end_marker(&frame) {
                        self.object.frames.push(frame);
                    }
                    true
                }
                None => false,
            },
        }
    }

    /// `backtrace:`, or `backtrace (crc 3b5a6a4e):` on newer kernels.
    fn accept_backtrace_header(&mut self, text: &str) -> bool {
        let Some(rest) = text.strip_prefix("backtrace") else {
            return false;
        };
        if !(rest.starts_with(':') || rest.starts_with(" (crc")) {
            return false;
        }
        self.section = Section::Backtrace;
        self.saw_backtrace = true;
        true
    }
}

/// Removes what dmesg, the journal or syslog put before the kernel's text. Every prefix is
/// recognized from the start of the line only, so text that merely contains `kernel: ` or
/// `kmemleak: ` further on is left alone (and a line cut short is never read as more than the
/// whole line would be).
fn strip_log_prefixes(line: &str) -> &str {
    let mut text = line;
    loop {
        let trimmed = text.trim_start();
        let stripped = strip_level(trimmed)
            .or_else(|| strip_timestamp(trimmed))
            .or_else(|| strip_syslog_header(trimmed))
            .or_else(|| trimmed.strip_prefix("kmemleak:"));
        match stripped {
            Some(rest) => text = rest,
            // The kernel's own indentation is not needed either: lines are told apart by content.
            None => return trimmed,
        }
    }
}

/// `<4>`, as `dmesg -r` and the console print the log level.
fn strip_level(text: &str) -> Option<&str> {
    let (level, rest) = text.strip_prefix('<')?.split_once('>')?;
    (!level.is_empty() && level.bytes().all(|byte| byte.is_ascii_digit())).then_some(rest)
}

/// `[  302.118725]`, or `[Mon Nov 23 11:46:00 2026]` from `dmesg -T`; `[<` opens a frame
/// address instead.
fn strip_timestamp(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('[')?;
    if inner.starts_with('<') {
        return None;
    }
    inner.split_once(']').map(|(_, rest)| rest)
}

/// `Nov 23 11:46:00 buildhost kernel: `, as journalctl -k and syslog files show kernel lines.
fn strip_syslog_header(text: &str) -> Option<&str> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    if !MONTHS.iter().any(|month| text.starts_with(month)) {
        return None;
    }
    text.split_once(" kernel: ").map(|(_, rest)| rest)
}

/// What follows `unreferenced object`: optional type labels, the address, then `(size N)`.
/// Anything after the size (a trailing `:`, labels of future kernels) is ignored.
fn parse_header(text: &str) -> Option<(Option<String>, u64)> {
    let mut object_type = None;
    let mut has_address = false;
    let mut rest = text;
    loop {
        rest = rest.trim_start();
        if let Some(group) = rest.strip_prefix('(') {
            let (label, after) = group.split_once(')')?;
            if let Some(size) = label.strip_prefix("size ") {
                let size = parse_decimal(size.trim())?;
                return has_address.then_some((object_type, size));
            }
            object_type = Some(label.trim().to_owned());
            rest = after;
        } else {
            let (address, after) = split_hex_prefix(rest.strip_prefix("0x")?);
            parse_hex(address)?;
            has_address = true;
            rest = after;
        }
    }
}

/// What follows `comm "`: `insmod", pid 4242, jiffies 4295187350 (age 12.345s)`. The name may
/// itself contain quotes, so the last `", pid ` ends it.
fn parse_task(text: &str) -> Option<(Task, Option<u64>)> {
    let (comm, rest) = text.rsplit_once("\", pid ")?;
    let (pid, rest) = split_decimal_prefix(rest);
    let task = Task {
        comm: comm.to_owned(),
        pid: pid.parse().ok()?,
    };
    Some((task, parse_age_ms(rest)))
}

/// `(age 12.345s)` as milliseconds.
fn parse_age_ms(text: &str) -> Option<u64> {
    let (_, age) = text.split_once("(age ")?;
    let (age, _) = age.split_once("s)")?;
    let (seconds, fraction) = age.split_once('.').unwrap_or((age, "0"));
    let seconds = parse_decimal(seconds)?;
    if fraction.len() > 3 {
        return None;
    }
    let millis = parse_decimal(fraction)? * 10u64.pow(3 - fraction.len() as u32);
    seconds.checked_mul(1000)?.checked_add(millis)
}

/// `hex dump (first 32 bytes):` or `hex dump (first 8 bytes on cpu 2):`.
fn parse_hex_dump_header(text: &str) -> Option<usize> {
    let rest = text.strip_prefix("hex dump (first ")?;
    let (count, _) = split_decimal_prefix(rest);
    count.parse().ok()
}

/// `4c 45 41 4b 59 21 00 00  LEAKY!..`: single-spaced byte pairs, then (after at least two
/// spaces) the ASCII column, which may contain anything and is ignored.
fn parse_hex_row(text: &str) -> Option<Vec<u8>> {
    let hex = text.split_once("  ").map_or(text, |(hex, _ascii)| hex);
    hex.split(' ')
        .map(|pair| {
            if pair.len() == 2 {
                parse_hex(pair).and_then(|byte| u8::try_from(byte).ok())
            } else {
                None
            }
        })
        .collect()
}

/// One backtrace line, as `%pS` prints it, after the `[<%p>] ` older kernels put before it:
/// `kmem_cache_alloc+0x15d/0x2a0`, `leaky_alloc+0x1c/0x40 [leaky]`, or a bare `0xffffffffc0a01234`
/// for an address no symbol covers.
fn parse_frame(text: &str) -> Option<Frame> {
    let (printed_address, text) = match text.strip_prefix("[<") {
        Some(rest) => {
            let (pointer, rest) = rest.split_once(">]")?;
            (parse_pointer(pointer), rest.trim_start())
        }
        None => (None, text),
    };
    let (location, module) = match text.split_once(char::is_whitespace) {
        Some((location, tail)) => (location, Some(parse_module(tail.trim())?)),
        None => (text, None),
    };
    if let Some(address) = location.strip_prefix("0x").and_then(parse_hex) {
        return Some(Frame {
            module,
            ..Frame::unknown(address)
        });
    }
    let (symbol, offsets) = location.rsplit_once('+')?;
    let (offset, size) = offsets.split_once('/')?;
    if symbol.is_empty() || symbol.starts_with('[') {
        return None;
    }
    Some(Frame {
        addr: printed_address,
        symbol: Some(symbol.to_owned()),
        offset: Some(parse_hex(offset.strip_prefix("0x")?)?),
        size: Some(parse_hex(size.strip_prefix("0x")?)?),
        module,
        source: None,
    })
}

/// `[leaky]`, or `[leaky 5f3c...]` when a build ID follows the module name.
fn parse_module(text: &str) -> Option<String> {
    let inner = text.strip_prefix('[')?.strip_suffix(']')?;
    inner.split_whitespace().next().map(str::to_owned)
}

/// The address inside `[<...>]`. Since 4.15 `%p` (and `%pK` under kptr_restrict=0) prints a
/// per-boot hash instead, 32 bits wide with zeroes above on 64-bit kernels: that is no address,
/// so it is dropped, as are the zeroes `%pK` prints to the unprivileged and the
/// `(____ptrval____)` printed before the hash key is ready.
fn parse_pointer(text: &str) -> Option<u64> {
    let value = parse_hex(text)?;
    let hashed = text.len() == 16 && value >> 32 == 0;
    (!hashed && value != 0).then_some(value)
}

/// Kernels before 5.2 ended every stack with a `ULONG_MAX` entry, printed as
/// `[<ffffffffffffffff>] 0xffffffffffffffff`.
fn is_end_marker(frame: &Frame) -> bool {
    frame.symbol.is_none() && frame.addr == Some(u64::MAX)
}

/// Hex digits only: `u64::from_str_radix` would also take a sign.
fn parse_hex(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// Decimal digits only, for the same reason.
fn parse_decimal(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn split_hex_prefix(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !c.is_ascii_hexdigit())
        .unwrap_or(text.len());
    text.split_at(end)
}

fn split_decimal_prefix(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    text.split_at(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODERN: &str = include_str!("../../testdata/kmemleak/modern.txt");
    const LEGACY: &str = include_str!("../../testdata/kmemleak/legacy.txt");
    const DMESG: &str = include_str!("../../testdata/kmemleak/dmesg.txt");
    const TICKET: &str = include_str!("../../testdata/kmemleak/ticket.txt");
    const HUGE: &str = include_str!("../../testdata/kmemleak/huge.txt");
    const SAMPLES: [&str; 5] = [MODERN, LEGACY, DMESG, TICKET, HUGE];

    fn frame(symbol: &str, offset: u64, size: u64, module: Option<&str>) -> Frame {
        Frame {
            addr: None,
            symbol: Some(symbol.to_owned()),
            offset: Some(offset),
            size: Some(size),
            module: module.map(str::to_owned),
            source: None,
        }
    }

    fn task(comm: &str, pid: u32) -> Option<Task> {
        Some(Task {
            comm: comm.to_owned(),
            pid,
        })
    }

    /// `text` up to the end of the first occurrence of `marker`.
    fn cut_after<'a>(text: &'a str, marker: &str) -> &'a str {
        let end = text.find(marker).expect("marker in sample") + marker.len();
        &text[..end]
    }

    #[test]
    fn parses_every_field_of_the_current_format() {
        let parsed = parse(MODERN);
        assert_eq!(parsed.objects.len(), 5);
        assert_eq!(parsed.unparsed_records, 0);
        assert_eq!(parsed.truncated_records(), 0);
        let first = &parsed.objects[0];
        assert_eq!(first.object_type, None);
        assert_eq!(first.size, 64);
        assert_eq!(first.task, task("insmod", 4242));
        assert_eq!(first.age_ms, None);
        assert_eq!(first.hex_dump.len(), 32);
        assert_eq!(&first.hex_dump[..8], b"LEAKY!\0\0");
        assert_eq!(
            first.hex_dump[16..24],
            [0x00, 0xc0, 0xa3, 0x04, 0x81, 0x88, 0xff, 0xff]
        );
        assert_eq!(first.frames.len(), 9);
        assert_eq!(first.frames[0], frame("kmemleak_alloc", 0x4a, 0x80, None));
        assert_eq!(
            first.frames[2],
            frame("leaky_alloc", 0x1c, 0x40, Some("leaky"))
        );
        assert_eq!(
            first.frames[8],
            frame("entry_SYSCALL_64_after_hwframe", 0x76, 0x7e, None)
        );
        assert_eq!(parsed.objects[2].size, 1024);
        assert_eq!(parsed.objects[2].task, task("systemd-udevd", 311));
    }

    #[test]
    fn parses_percpu_and_phys_objects() {
        let parsed = parse(MODERN);
        let percpu = &parsed.objects[3];
        assert_eq!(percpu.object_type.as_deref(), Some("percpu"));
        assert_eq!(percpu.size, 8);
        // `(first 8 bytes on cpu 2)`: a short row, padded before its ASCII column.
        assert_eq!(percpu.hex_dump, [0x2a, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            percpu.frames[0],
            frame("pcpu_alloc_noprof", 0x4c3, 0x8b0, None)
        );
        let phys = &parsed.objects[4];
        assert_eq!(phys.object_type.as_deref(), Some("phys"));
        assert_eq!(phys.task, task("swapper/0", 0));
        // The kernel prints no hex dump for physical objects: nothing is missing.
        assert!(phys.hex_dump.is_empty());
        assert!(!phys.truncated);
        assert_eq!(phys.frames.len(), 6);
    }

    #[test]
    fn parses_ages_and_addressed_frames_of_older_kernels() {
        let parsed = parse(LEGACY);
        assert_eq!(parsed.objects.len(), 3);
        assert_eq!(parsed.truncated_records(), 0);
        let hashed = &parsed.objects[0];
        assert_eq!(hashed.age_ms, Some(302_120));
        assert_eq!(hashed.task, task("modprobe", 1234));
        // `[<00000000c9e2a3f1>]` is a per-boot hash, not an address.
        assert_eq!(
            hashed.frames[1],
            frame("mydrv_probe", 0x3a, 0x1f0, Some("mydrv"))
        );
        let addressed = &parsed.objects[2];
        assert_eq!(addressed.age_ms, Some(12_345));
        assert_eq!(addressed.task, task("kworker/u8:1", 57));
        assert_eq!(
            addressed.frames[2],
            Frame {
                addr: Some(0xffff_ffff_a012_3456),
                ..frame("mydrv_work", 0x56, 0x120, Some("mydrv"))
            }
        );
        assert_eq!(addressed.frames[5], Frame::unknown(0xffff_ffff_a012_4000));
        // The `[<ffffffffffffffff>] 0xffffffffffffffff` end marker is not a frame.
        assert_eq!(addressed.frames.len(), 8);
        assert_eq!(addressed.frames[7].symbol.as_deref(), Some("ret_from_fork"));
    }

    #[test]
    fn strips_dmesg_and_journal_prefixes() {
        let parsed = parse(DMESG);
        assert_eq!(parsed.objects.len(), 3);
        assert_eq!(parsed.unparsed_records, 0);
        assert_eq!(parsed.truncated_records(), 0);
        let modern = parse(MODERN);
        for (from_dmesg, original) in parsed.objects.iter().zip(&modern.objects) {
            assert_eq!(from_dmesg.size, original.size);
            assert_eq!(from_dmesg.task, original.task);
            assert_eq!(from_dmesg.hex_dump, original.hex_dump);
            assert_eq!(
                from_dmesg.frames[..],
                original.frames[..from_dmesg.frames.len()]
            );
        }
        // The unrelated e1000e message ended the first record's backtrace.
        assert_eq!(parsed.objects[0].frames.len(), 5);
        assert_eq!(parsed.objects[2].frames.len(), 4);
    }

    #[test]
    fn strips_each_kind_of_log_prefix() {
        for line in [
            "unreferenced object 0x1 (size 2):",
            "kmemleak: unreferenced object 0x1 (size 2):",
            "[  302.118725] kmemleak: unreferenced object 0x1 (size 2):",
            "<4>[  302.118725] kmemleak: unreferenced object 0x1 (size 2):",
            "[Mon Nov 23 11:46:02 2026] kmemleak: unreferenced object 0x1 (size 2):",
            "Nov 23 11:46:02 buildhost kernel: kmemleak: unreferenced object 0x1 (size 2):",
        ] {
            assert_eq!(
                strip_log_prefixes(line),
                "unreferenced object 0x1 (size 2):",
                "{line}"
            );
        }
        assert_eq!(
            strip_log_prefixes("    [<ffffffff8176c7fe>] kmemleak_alloc+0x4e/0xb0"),
            "[<ffffffff8176c7fe>] kmemleak_alloc+0x4e/0xb0"
        );
        // Not at the start of the line: report text, not a prefix.
        assert_eq!(
            strip_log_prefixes("leaky: kmemleak: said so"),
            "leaky: kmemleak: said so"
        );
        // A log level is digits, at least one.
        for not_a_level in ["<abc> said so", "<> said so", "<4a> said so"] {
            assert_eq!(strip_log_prefixes(not_a_level), not_a_level);
        }
    }

    #[test]
    fn reads_windows_line_endings() {
        for sample in SAMPLES {
            assert_eq!(parse(&sample.replace('\n', "\r\n")), parse(sample));
        }
    }

    #[test]
    fn counts_unparsable_records_and_skips_garbage() {
        let parsed = parse(TICKET);
        // `0xZZZZ` and `(size sixty-four)`; "unreferenced objects like these" is prose.
        assert_eq!(parsed.unparsed_records, 2);
        assert_eq!(parsed.objects.len(), 1);
        let object = &parsed.objects[0];
        assert_eq!(object.size, 96);
        // The stray line inside the hex dump is skipped, the row after it kept.
        assert_eq!(object.hex_dump.len(), 32);
        assert!(!object.truncated);
        // The backtrace ends at the prose after it; the frame quoted later is not added.
        assert_eq!(object.frames.len(), 4);
        assert_eq!(
            object.frames[3],
            frame("leaky_ioctl", 0x120, 0x200, Some("leaky"))
        );
    }

    #[test]
    fn flags_a_record_cut_in_its_hex_dump() {
        let cut = cut_after(MODERN, "00 00 00 00 00 00 00  LEAKY!..........\n");
        let parsed = parse(cut);
        assert_eq!(parsed.objects.len(), 1);
        let object = &parsed.objects[0];
        assert!(object.truncated);
        assert_eq!(object.hex_dump.len(), 16);
        assert!(object.frames.is_empty());
        assert_eq!(object.task, task("insmod", 4242));
        // Cut inside a row: the partial row is not trusted.
        let parsed = parse(cut_after(MODERN, "    4c 45 41 4b 5"));
        assert!(parsed.objects[0].truncated);
        assert!(parsed.objects[0].hex_dump.is_empty());
    }

    #[test]
    fn flags_a_record_cut_in_its_backtrace() {
        let parsed = parse(cut_after(MODERN, "    leaky_in"));
        let object = &parsed.objects[0];
        assert!(object.truncated);
        assert_eq!(object.frames.len(), 3);
        assert_eq!(
            object.frames[2],
            frame("leaky_alloc", 0x1c, 0x40, Some("leaky"))
        );

        let parsed = parse(cut_after(MODERN, "backtrace (crc 3b5a6a4e):\n"));
        assert!(parsed.objects[0].truncated);
        assert!(parsed.objects[0].frames.is_empty());
    }

    /// The first record of MODERN, whole.
    fn first_modern_record() -> &'static str {
        cut_after(MODERN, "do_syscall_64+0x82/0x170\n")
    }

    /// The first record of MODERN with `from` replaced by `to`.
    fn first_modern_record_with(from: &str, to: &str) -> String {
        let record = first_modern_record();
        assert!(record.contains(from), "the first record has no `{from}`");
        record.replace(from, to)
    }

    #[test]
    fn a_hex_dump_shorter_than_announced_is_truncated_even_when_the_record_goes_on() {
        let record = first_modern_record();
        let short = first_modern_record_with(
            "    00 c0 a3 04 81 88 ff ff 00 00 00 00 00 00 00 00  ................\n",
            "",
        );
        let parsed = parse(&short);
        assert_eq!(parsed.objects[0].hex_dump.len(), 16);
        assert_eq!(parsed.objects[0].frames.len(), 8);
        assert!(parsed.objects[0].truncated);
        assert_eq!(parsed.truncated_records(), 1);
        // Two records, one of them cut: each is counted once.
        let parsed = parse(&format!("{record}{short}"));
        assert_eq!(parsed.objects.len(), 2);
        assert_eq!(parsed.truncated_records(), 1);
        assert!(!parsed.objects[0].truncated);
    }

    #[test]
    fn numbers_are_digits_only_without_a_sign() {
        assert_eq!(parse_decimal("64"), Some(64));
        assert_eq!(parse_hex("ff"), Some(0xff));
        for signed in ["+64", "-64", ""] {
            assert_eq!(parse_decimal(signed), None, "{signed:?}");
            assert_eq!(parse_hex(signed), None, "{signed:?}");
        }
        let parsed = parse("unreferenced object 0xffff888104a3c000 (size +64):\n");
        assert_eq!((parsed.objects.len(), parsed.unparsed_records), (0, 1));
    }

    #[test]
    fn a_message_between_the_backtrace_header_and_its_first_frame_is_skipped() {
        let interrupted = first_modern_record_with(
            "backtrace (crc 3b5a6a4e):\n",
            "backtrace (crc 3b5a6a4e):\nleaky: a message from another CPU\n",
        );
        let parsed = parse(&interrupted);
        assert_eq!(parsed.objects.len(), 1);
        assert_eq!(parsed.objects[0].frames.len(), 8);
        assert_eq!(parsed.objects[0], parse(first_modern_record()).objects[0]);
    }

    #[test]
    fn a_complete_report_without_final_newline_is_not_truncated() {
        assert_eq!(parse(MODERN.trim_end()), parse(MODERN));
    }

    #[test]
    fn empty_input_has_no_records() {
        assert_eq!(parse(""), ParsedReport::default());
        assert_eq!(parse("\n\r\n   \n"), ParsedReport::default());
    }

    #[test]
    fn takes_sizes_and_ids_at_their_limits() {
        let parsed = parse(HUGE);
        assert_eq!(parsed.objects.len(), 2);
        // 184467440737095516150 does not fit in 64 bits.
        assert_eq!(parsed.unparsed_records, 1);
        let huge = &parsed.objects[0];
        assert_eq!(huge.size, u64::MAX);
        assert_eq!(huge.task, task("bigalloc", u32::MAX));
        assert_eq!(huge.age_ms, Some(4_294_967_295));
        assert_eq!(parsed.objects[1].age_ms, Some(1_500));
    }

    #[test]
    fn no_prefix_of_a_report_yields_more_objects_than_the_whole() {
        for sample in SAMPLES {
            for sample in [sample.to_owned(), sample.replace('\n', "\r\n")] {
                let whole = parse(&sample).objects.len();
                let mut previous = 0;
                for end in (0..=sample.len()).filter(|&end| sample.is_char_boundary(end)) {
                    let objects = parse(&sample[..end]).objects.len();
                    assert!(
                        previous <= objects && objects <= whole,
                        "cut at {end}: {objects} objects after {previous}, {whole} in all"
                    );
                    previous = objects;
                }
                assert_eq!(previous, whole);
            }
        }
    }

    #[test]
    fn reads_each_frame_form() {
        assert_eq!(
            parse_frame("kmem_cache_alloc+0x15d/0x2a0"),
            Some(frame("kmem_cache_alloc", 0x15d, 0x2a0, None))
        );
        assert_eq!(
            parse_frame("[<ffffffff8122e0bd>] kmem_cache_alloc+0x15d/0x2a0"),
            Some(Frame {
                addr: Some(0xffff_ffff_8122_e0bd),
                ..frame("kmem_cache_alloc", 0x15d, 0x2a0, None)
            })
        );
        assert_eq!(
            parse_frame("[<00000000c9e2a3f1>] __kmalloc+0x1d1/0x480"),
            Some(frame("__kmalloc", 0x1d1, 0x480, None))
        );
        assert_eq!(
            parse_frame("[<(____ptrval____)>] leaky_alloc.cold+0x0/0x12 [leaky]"),
            Some(frame("leaky_alloc.cold", 0, 0x12, Some("leaky")))
        );
        assert_eq!(
            parse_frame("leaky_alloc+0x1c/0x40 [leaky 5f3ca1b2c3d4e5f6]"),
            Some(frame("leaky_alloc", 0x1c, 0x40, Some("leaky")))
        );
        assert_eq!(
            parse_frame("0xffffffffc0a01234 [leaky]"),
            Some(Frame {
                module: Some("leaky".to_owned()),
                ..Frame::unknown(0xffff_ffff_c0a0_1234)
            })
        );
        for garbage in [
            "",
            "leaky_in",
            "leaky_alloc+0x1c",
            "leaky_alloc+0x1c/",
            "leaky_alloc+0x1c/0x4g",
            "leaky_alloc+-0x1c/0x40",
            "+0x1c/0x40",
            "[<ffffffff8122e0bd",
            "leaky_alloc+0x1c/0x40 [leaky",
            "leaky_alloc+0x1c/0x40 trailing words",
            "? leaky_alloc+0x1c/0x40",
            "Could someone have a look?",
        ] {
            assert_eq!(parse_frame(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn reads_each_header_form() {
        assert_eq!(
            parse_header(" 0xffff888104a3c000 (size 64):"),
            Some((None, 64))
        );
        assert_eq!(
            parse_header(" (percpu) 0x00003c7fbfa0a7e0 (size 8):"),
            Some((Some("percpu".to_owned()), 8))
        );
        assert_eq!(
            parse_header(" 0xc1234567 (size 8) (crc 3b5a6a4e):"),
            Some((None, 8))
        );
        assert_eq!(parse_header(" 0xc1234567 (size 8)"), Some((None, 8)));
        for garbage in [
            "",
            " (size 8):",
            " 0x (size 8):",
            " 0xffff888104a3c000:",
            " 0xffff888104a3c000 (size 6",
            " 0xffff888104a3c000 (size -8):",
            " 0x1ffff888104a3c0000 (size 8):",
            " at 0xffff888104a3c000 (size 8):",
        ] {
            assert_eq!(parse_header(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn reads_hex_rows_whatever_their_ascii_column_holds() {
        assert_eq!(
            parse_hex_row("00 11 22 33  ..\"3  ab cd"),
            Some(vec![0x00, 0x11, 0x22, 0x33])
        );
        assert_eq!(parse_hex_row("ab"), Some(vec![0xab]));
        assert_eq!(parse_hex_row("6b 6b 6"), None);
        assert_eq!(parse_hex_row("+b 6b"), None);
        assert_eq!(parse_hex_row("this line is not part of the dump"), None);
    }
}
