//! The clock the eBPF programs time allocations with, and its conversion to CLOCK_MONOTONIC.
//!
//! `bpf_ktime_get_ns()` costs 50-70 ns per tracked allocation on a VM with the `tsc`
//! clocksource, a third of the slab hook (docs/overhead.md); `bpf_jiffies64()` is a load the
//! verifier inlines (Linux 5.5+). So the programs record jiffies, and userspace converts them
//! as it reads the table: ages are then exact to two ticks (2-20 ms) and never longer than the
//! object's, which is enough for reports in milliseconds and watch intervals of seconds. The
//! conversion needs the tick length and one pair of readings of both clocks at the same tick,
//! which `/proc/timer_list` gives (root only, `CONFIG_TICK_ONESHOT`); without it the programs
//! read the nanosecond clock.

use std::{io::BufRead as _, time::Duration};

use crate::util::clock::{monotonic_coarse_now_ns, monotonic_now_ns};

const TIMER_LIST: &str = "/proc/timer_list";

/// The tick rates an x86-64 kernel may be built with (`CONFIG_HZ`).
const TICK_RATES: [u64; 4] = [100, 250, 300, 1000];

/// How far the uptime that jiffies imply may be from CLOCK_MONOTONIC for a tick rate to be
/// believed: jiffies start counting at the first tick, a fraction of a second after
/// timekeeping starts (0.16 s on this project's test machine), and stay in step with it.
const TICK_RATE_TOLERANCE: Duration = Duration::from_secs(5);

/// How the table's allocation times read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocationClock {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds already.
    Monotonic,
    /// `bpf_jiffies64()`.
    Jiffies(JiffiesClock),
}

/// The conversion of jiffies: CLOCK_MONOTONIC_COARSE read `anchor_ns` while the jiffies count
/// was `anchor_jiffies`, and each jiffy lasts `tick_ns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JiffiesClock {
    pub tick_ns: u64,
    pub anchor_jiffies: u64,
    pub anchor_ns: u64,
}

impl AllocationClock {
    /// Jiffies when this kernel's tick rate and a reading of both clocks at one tick can be had
    /// from `/proc/timer_list`, else the nanosecond clock.
    pub fn detect() -> Self {
        // CLOCK_MONOTONIC_COARSE advances at the tick, just after jiffies do. Read between two
        // equal jiffies counts, it is that count's tick time, or the tick before's when the
        // read fell between the two updates: of a few readings, the latest tick time is kept.
        const READINGS: usize = 3;
        let mut latest: Option<JiffiesClock> = None;
        let mut readings = 0;
        for _ in 0..4 * READINGS {
            let Some(jiffies) = read_jiffies() else {
                return Self::Monotonic;
            };
            let coarse_ns = monotonic_coarse_now_ns();
            if read_jiffies() != Some(jiffies) {
                continue;
            }
            let Some(tick_ns) = tick_ns_for(jiffies, monotonic_now_ns()) else {
                return Self::Monotonic;
            };
            let reading = JiffiesClock {
                tick_ns,
                anchor_jiffies: jiffies,
                anchor_ns: coarse_ns,
            };
            if latest
                .is_none_or(|kept| reading.tick_start_ns(jiffies) > kept.tick_start_ns(jiffies))
            {
                latest = Some(reading);
            }
            readings += 1;
            if readings == READINGS {
                break;
            }
        }
        latest.map_or(Self::Monotonic, Self::Jiffies)
    }

    pub fn uses_jiffies(&self) -> bool {
        matches!(self, Self::Jiffies(_))
    }

    /// How far an age computed from a converted reading may fall short of the object's (see
    /// [`JiffiesClock::to_monotonic_ns`]).
    pub fn resolution(&self) -> Duration {
        match self {
            Self::Monotonic => Duration::ZERO,
            Self::Jiffies(jiffies) => Duration::from_nanos(2 * jiffies.tick_ns),
        }
    }

    /// The whole clock ticks that last at least `interval` (one at least): by the measured tick
    /// where jiffies are read, else by HZ=250, the tick rate most distributions build with.
    pub fn ticks_spanning(&self, interval: Duration) -> u32 {
        const USUAL_TICK_NS: u64 = 1_000_000_000 / 250;
        let tick_ns = match self {
            Self::Monotonic => USUAL_TICK_NS,
            Self::Jiffies(jiffies) => jiffies.tick_ns.max(1),
        };
        let ticks = (interval.as_nanos() as u64).div_ceil(tick_ns).max(1);
        u32::try_from(ticks).unwrap_or(u32::MAX)
    }

    /// How long `ticks` clock ticks last, where the tick was measured (jiffies are read);
    /// `None` where [`Self::ticks_spanning`] had to assume HZ=250.
    pub fn span_of(&self, ticks: u32) -> Option<Duration> {
        match self {
            Self::Monotonic => None,
            Self::Jiffies(jiffies) => {
                Some(Duration::from_nanos(u64::from(ticks) * jiffies.tick_ns))
            }
        }
    }

    /// CLOCK_MONOTONIC nanoseconds of a reading the programs recorded.
    pub fn to_monotonic_ns(&self, reading: u64) -> u64 {
        match self {
            Self::Monotonic => reading,
            Self::Jiffies(jiffies) => jiffies.to_monotonic_ns(reading),
        }
    }

    /// The reading the programs would have recorded at CLOCK_MONOTONIC `ns`, inverse of
    /// [`Self::to_monotonic_ns`] on the times it returns.
    pub fn reading_at(&self, ns: u64) -> u64 {
        match self {
            Self::Monotonic => ns,
            Self::Jiffies(jiffies) => jiffies.reading_at(ns),
        }
    }
}

impl JiffiesClock {
    /// Never earlier than the allocation, so that an age is never more than the object's; it
    /// is less by up to two ticks. The anchor's coarse time is the tick's time rounded down to
    /// the timekeeper's own tick-long steps, so up to a tick before the jiffies count changed:
    /// the allocation fell in the tick after that change, hence the two ticks.
    fn to_monotonic_ns(self, reading: u64) -> u64 {
        let latest = self.tick_start_ns(reading) + 2 * i128::from(self.tick_ns);
        latest.clamp(0, i128::from(u64::MAX)) as u64
    }

    fn reading_at(self, ns: u64) -> u64 {
        let since = i128::from(ns) - i128::from(self.anchor_ns) - 1;
        let ticks = since.div_euclid(i128::from(self.tick_ns)) - 1;
        (i128::from(self.anchor_jiffies) + ticks).clamp(0, i128::from(u64::MAX)) as u64
    }

    /// The coarse clock's time at the tick of `reading`, as the anchor was read.
    fn tick_start_ns(self, reading: u64) -> i128 {
        i128::from(self.anchor_ns)
            + (i128::from(reading) - i128::from(self.anchor_jiffies)) * i128::from(self.tick_ns)
    }
}

/// The jiffies count now, from the first lines of `/proc/timer_list` (the file is generated as
/// it is read, and is long on machines with many CPUs).
fn read_jiffies() -> Option<u64> {
    let file = std::fs::File::open(TIMER_LIST).ok()?;
    std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| parse_jiffies_line(&line))
}

/// The jiffies count of a `/proc/timer_list` line `jiffies: N` (the tick device sections
/// print `.idle_jiffies` and `.last_jiffies` too, which are other counts).
pub fn parse_jiffies_line(line: &str) -> Option<u64> {
    line.strip_prefix("jiffies:")?.trim().parse().ok()
}

/// The tick length of the kernel whose jiffies count is `jiffies` at CLOCK_MONOTONIC
/// `monotonic_ns`. jiffies start at `INITIAL_JIFFIES`, `(u32)(-300 * HZ)`, at boot, as
/// CLOCK_MONOTONIC starts at 0, so the right rate makes the two agree. A wrong rate agrees
/// too at one uptime (HZ=300's count read as HZ=250's matches at 300 s): when two rates
/// agree, none is believed.
pub fn tick_ns_for(jiffies: u64, monotonic_ns: u64) -> Option<u64> {
    let mut agreeing = TICK_RATES.iter().filter(|&&hz| {
        let initial = u64::from((300 * hz as u32).wrapping_neg());
        jiffies.checked_sub(initial).is_some_and(|ticks| {
            let uptime_ns = u128::from(ticks) * 1_000_000_000 / u128::from(hz);
            uptime_ns.abs_diff(u128::from(monotonic_ns)) <= TICK_RATE_TOLERANCE.as_nanos()
        })
    });
    match (agreeing.next(), agreeing.next()) {
        (Some(&hz), None) => Some(1_000_000_000 / hz),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start of `/proc/timer_list` and one CPU's tick device, recorded on Linux 6.18
    /// (HZ=250) 64,361 s after boot.
    const TIMER_LIST_6_18: &str = "Timer List Version: v0.10
HRTIMER_MAX_CLOCK_BASES: 8
now at 64361082881916 nsecs

cpu: 0
 clock 0:
  .base:               pcpu
  .index:      0
  .idle_jiffies   : 4310982489
  .last_jiffies   : 4310982489
  .next_timer     : 64361084000000
jiffies: 4310982527
";

    #[test]
    fn the_jiffies_count_is_the_plain_line_not_a_tick_device_field() {
        let counts: Vec<u64> = TIMER_LIST_6_18
            .lines()
            .filter_map(parse_jiffies_line)
            .collect();
        assert_eq!(counts, [4_310_982_527]);
        assert_eq!(parse_jiffies_line("jiffies: many"), None);
    }

    #[test]
    fn the_tick_rate_is_the_one_whose_jiffies_agree_with_the_uptime() {
        // The recording above: HZ=250.
        assert_eq!(
            tick_ns_for(4_310_982_527, 64_361_082_881_916),
            Some(4_000_000)
        );
        // Ten seconds after boot, when every rate's count is still near its start.
        let initial_1000 = u64::from((300_000u32).wrapping_neg());
        assert_eq!(
            tick_ns_for(initial_1000 + 10_000, 10_000_000_000),
            Some(1_000_000)
        );
        let initial_100 = u64::from((30_000u32).wrapping_neg());
        assert_eq!(
            tick_ns_for(initial_100 + 1_000, 10_000_000_000),
            Some(10_000_000)
        );
        // A count no rate explains.
        assert_eq!(tick_ns_for(5, 10_000_000_000), None);
        // HZ=300 at 300 s of uptime reads as HZ=250 too: neither is believed.
        let initial_300 = u64::from((90_000u32).wrapping_neg());
        assert_eq!(tick_ns_for(initial_300 + 90_000, 300_000_000_000), None);
        assert_eq!(
            tick_ns_for(initial_300 + 300_000, 1_000_000_000_000),
            Some(3_333_333)
        );
    }

    #[test]
    fn an_interval_spans_whole_ticks_of_the_kernels_rate() {
        let at_hz = |hz: u64| {
            AllocationClock::Jiffies(JiffiesClock {
                tick_ns: 1_000_000_000 / hz,
                anchor_jiffies: 0,
                anchor_ns: 0,
            })
        };
        let interval = Duration::from_millis(16);
        assert_eq!(at_hz(250).ticks_spanning(interval), 4);
        assert_eq!(at_hz(1000).ticks_spanning(interval), 16);
        // 10 ms ticks: two, not one shorter than asked.
        assert_eq!(at_hz(100).ticks_spanning(interval), 2);
        // 3.33 ms ticks: five make 16.7 ms.
        assert_eq!(at_hz(300).ticks_spanning(interval), 5);
        assert_eq!(AllocationClock::Monotonic.ticks_spanning(interval), 4);
        assert_eq!(at_hz(250).ticks_spanning(Duration::ZERO), 1);
        // What the report says the limit is: the whole ticks, at the measured rate only.
        let span = |hz: u64| {
            let clock = at_hz(hz);
            clock.span_of(clock.ticks_spanning(interval))
        };
        assert_eq!(span(250), Some(Duration::from_millis(16)));
        assert_eq!(span(100), Some(Duration::from_millis(20)));
        assert_eq!(span(300), Some(Duration::from_nanos(5 * 3_333_333)));
        assert_eq!(AllocationClock::Monotonic.span_of(4), None);
    }

    #[test]
    fn readings_convert_to_monotonic_time_and_back() {
        let clock = AllocationClock::Jiffies(JiffiesClock {
            tick_ns: 4_000_000,
            anchor_jiffies: 1_000,
            anchor_ns: 50_000_000_000,
        });
        // A reading converts to two ticks after its tick's coarse time: never before the
        // allocation.
        assert_eq!(clock.to_monotonic_ns(1_000), 50_008_000_000);
        assert_eq!(clock.to_monotonic_ns(1_250), 51_008_000_000);
        assert_eq!(clock.to_monotonic_ns(750), 49_008_000_000);
        assert_eq!(clock.to_monotonic_ns(0), 46_008_000_000);
        assert_eq!(clock.resolution(), Duration::from_millis(8));
        for reading in [0, 999, 1_000, 1_001, 123_456] {
            assert_eq!(clock.reading_at(clock.to_monotonic_ns(reading)), reading);
        }
        // The times a reading may stand for: a tick long, ending at its converted time.
        assert_eq!(clock.reading_at(51_004_000_001), 1_250);
        assert_eq!(clock.reading_at(51_004_000_000), 1_249);
        assert_eq!(AllocationClock::Monotonic.to_monotonic_ns(77), 77);
        assert_eq!(AllocationClock::Monotonic.reading_at(77), 77);
        assert_eq!(AllocationClock::Monotonic.resolution(), Duration::ZERO);
    }
}
