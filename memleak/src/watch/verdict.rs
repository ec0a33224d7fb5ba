//! Whether an allocation site leaks, judged from its series of interval snapshots rather than
//! from one: a leak keeps growing, its objects keep aging (they are never replaced), and the
//! growth does not level off. A warm cache grows and then stops; a pool replaces its members,
//! so its oldest object stays young; churn goes up and down.
//!
//! - **Trend**: the Mann-Kendall test (is the count rising, beyond chance, whatever the shape
//!   of the rise?) and the Theil-Sen slope (the median of the slopes between every two
//!   points, which a few outliers do not move).
//! - **Levelling off**: the slope of the most recent half of the series against the whole.
//! - **Aging**: the age of the site's oldest outstanding object grows with the wall clock.
//! - **Settled**: the oldest object is older than any free memleak cannot see could take.
//!   kfree_rcu batches drain every 5 s after a grace period, lazy RCU defers callbacks up to
//!   10 s more, and those objects are still allocated in the slab until then: a site whose
//!   objects all go that way (closed epolls) grows for seconds, with aging objects, and is
//!   not leaking.
//!
//! Pure: series in, verdicts out (tested on synthetic series below).
use serde::{Deserialize, Serialize};

/// One interval's snapshot of one site.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Point {
    /// Seconds since the watch (or its history) started.
    pub at_seconds: f64,
    /// Outstanding objects and bytes (scaled by the sample rate when sampled).
    pub count: u64,
    pub bytes: u64,
    /// Age of the oldest outstanding object, in seconds; 0 with none.
    pub oldest_age_seconds: f64,
    /// Objects found free in kernel memory: their free fired no event.
    pub found_free: u64,
}

/// How bad a leak is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Growth beyond chance, not (yet) shown to be a leak: too short, levelled off, or its
    /// objects are replaced.
    Info,
    /// Sustained growth of objects that are never freed.
    Warning,
    /// A warning that has lasted long or grown large.
    Critical,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// The thresholds of the verdict; every one has a command-line option (docs/cli.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Intervals needed before any verdict.
    pub min_points: usize,
    /// The one-sided Mann-Kendall p-value below which growth is beyond chance.
    pub significance: f64,
    /// Growth, in objects over the series, below which nothing is reported.
    pub min_growth_objects: u64,
    /// Intervals of significant growth of aging objects before a warning.
    pub warning_points: usize,
    /// A warning becomes critical past this many leaked bytes...
    pub critical_bytes: u64,
    /// ...or after growing this long.
    pub critical_seconds: f64,
    /// Seconds a site's oldest object must be outstanding before its growth can be a leak.
    pub settle_seconds: f64,
    /// The allocation hooks are attached only part of the time (`--duty`).
    pub duty_cycled: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_points: 4,
            significance: 0.01,
            min_growth_objects: 8,
            warning_points: 6,
            critical_bytes: 64 << 20,
            critical_seconds: 3600.0,
            settle_seconds: 30.0,
            duty_cycled: false,
        }
    }
}

/// What the series of one site shows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    pub severity: Severity,
    /// 1 - the Mann-Kendall p-value, halved when the objects are not shown to age.
    pub confidence: f64,
    /// Theil-Sen slopes over the series.
    pub objects_per_second: f64,
    pub bytes_per_second: f64,
    /// Growth over the series (last minus first), in objects and bytes.
    pub grown_objects: i64,
    pub grown_bytes: i64,
    /// Seconds the series covers.
    pub seconds: f64,
    /// Intervals judged.
    pub points: usize,
    /// The oldest object aged with the wall clock: the objects are not being replaced.
    pub aging: bool,
    /// The recent half of the series grows at under a quarter of the whole's slope.
    pub levelled_off: bool,
    /// The oldest object is older than the settle time: it is not waiting for a deferred
    /// free (RCU) that memleak cannot see.
    #[serde(default = "settled_by_default")]
    pub settled: bool,
    /// Duty-cycled, and some of the site's objects were found free in kernel memory (their
    /// frees fire no event): no more than info. Such an object's slot, taken again while the
    /// allocation hooks were detached, keeps its record, which then ages like a leak.
    #[serde(default)]
    pub frees_unseen: bool,
}

/// Verdicts stored before `settled` existed were only made of settled sites.
fn settled_by_default() -> bool {
    true
}

/// Judges one site's series, oldest point first; `None` when it shows no growth worth a
/// line (too few points, no significant rise, or less than `min_growth_objects`).
pub fn judge(points: &[Point], thresholds: &Thresholds) -> Option<Judgement> {
    if points.len() < thresholds.min_points.max(3) {
        return None;
    }
    let counts: Vec<f64> = points.iter().map(|point| point.count as f64).collect();
    let times: Vec<f64> = points.iter().map(|point| point.at_seconds).collect();
    let p_value = mann_kendall_p(&counts);
    let (first, last) = (points.first()?, points.last()?);
    let grown_objects = last.count as i64 - first.count as i64;
    if p_value > thresholds.significance || grown_objects < thresholds.min_growth_objects as i64 {
        return None;
    }
    let objects_per_second = theil_sen(&times, &counts);
    if objects_per_second <= 0.0 {
        return None;
    }
    let bytes: Vec<f64> = points.iter().map(|point| point.bytes as f64).collect();
    let bytes_per_second = theil_sen(&times, &bytes);
    let seconds = last.at_seconds - first.at_seconds;

    let recent = &points[points.len() / 2..];
    let recent_slope = theil_sen(
        &recent
            .iter()
            .map(|point| point.at_seconds)
            .collect::<Vec<_>>(),
        &recent
            .iter()
            .map(|point| point.count as f64)
            .collect::<Vec<_>>(),
    );
    let levelled_off = recent_slope < objects_per_second / 4.0;
    // A leak's oldest object was allocated before the series began and is still there: its
    // age grows as fast as the clock. Half the clock leaves room for the oldest object being
    // freed by the one path memleak does not see, or an interval read late.
    let aging = last.oldest_age_seconds - first.oldest_age_seconds >= seconds / 2.0;
    let settled = last.oldest_age_seconds >= thresholds.settle_seconds;
    let frees_unseen = thresholds.duty_cycled && points.iter().any(|point| point.found_free > 0);

    let leaking = aging
        && settled
        && !levelled_off
        && !frees_unseen
        && points.len() >= thresholds.warning_points;
    let severity = if !leaking {
        Severity::Info
    } else if last.bytes.saturating_sub(first.bytes) >= thresholds.critical_bytes
        || seconds >= thresholds.critical_seconds
    {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let confidence = (1.0 - p_value) * if aging && settled { 1.0 } else { 0.5 };
    Some(Judgement {
        severity,
        confidence,
        objects_per_second,
        bytes_per_second,
        grown_objects,
        grown_bytes: last.bytes as i64 - first.bytes as i64,
        seconds,
        points: points.len(),
        aging,
        levelled_off,
        settled,
        frees_unseen,
    })
}

/// The Theil-Sen slope: the median of the slopes between every two points (at distinct
/// times). 0 with fewer than two.
pub fn theil_sen(times: &[f64], values: &[f64]) -> f64 {
    let mut slopes = Vec::with_capacity(times.len() * times.len() / 2);
    for i in 0..times.len() {
        for j in i + 1..times.len() {
            let dt = times[j] - times[i];
            if dt > 0.0 {
                slopes.push((values[j] - values[i]) / dt);
            }
        }
    }
    if slopes.is_empty() {
        return 0.0;
    }
    slopes.sort_by(f64::total_cmp);
    let middle = slopes.len() / 2;
    if slopes.len() % 2 == 1 {
        slopes[middle]
    } else {
        (slopes[middle - 1] + slopes[middle]) / 2.0
    }
}

/// The one-sided p-value of the Mann-Kendall test for an upward trend: the probability of a
/// rise at least this consistent if the values were in random order. Ties are corrected for;
/// the normal approximation with continuity correction is used (fine from about 8 points,
/// conservative below).
pub fn mann_kendall_p(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 3 {
        return 1.0;
    }
    let mut s = 0i64;
    for i in 0..n {
        for j in i + 1..n {
            s += match values[j].total_cmp(&values[i]) {
                std::cmp::Ordering::Greater => 1,
                std::cmp::Ordering::Less => -1,
                std::cmp::Ordering::Equal => 0,
            };
        }
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut tie_term = 0.0;
    let mut run = 1usize;
    for index in 1..=n {
        if index < n && sorted[index] == sorted[index - 1] {
            run += 1;
        } else {
            let t = run as f64;
            tie_term += t * (t - 1.0) * (2.0 * t + 5.0);
            run = 1;
        }
    }
    let nf = n as f64;
    let variance = (nf * (nf - 1.0) * (2.0 * nf + 5.0) - tie_term) / 18.0;
    if s <= 0 || variance <= 0.0 {
        return if s > 0 { 0.0 } else { 1.0 };
    }
    let z = (s as f64 - 1.0) / variance.sqrt();
    1.0 - standard_normal_cdf(z)
}

/// Φ(z), from the complementary error function (Numerical Recipes' erfc, |error| < 1.2e-7).
fn standard_normal_cdf(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let polynomial = -x * x - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * polynomial.exp();
    let erfc = if x >= 0.0 { erfc } else { 2.0 - erfc };
    1.0 - erfc / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A series sampled every `interval` seconds; `at(i)` gives (count, oldest age).
    fn series(points: usize, interval: f64, at: impl Fn(usize) -> (u64, f64)) -> Vec<Point> {
        (0..points)
            .map(|i| {
                let (count, oldest_age_seconds) = at(i);
                Point {
                    at_seconds: i as f64 * interval,
                    count,
                    bytes: count * 64,
                    oldest_age_seconds,
                    found_free: 0,
                }
            })
            .collect()
    }

    /// A deterministic jitter in [-amplitude, amplitude].
    fn jitter(i: usize, amplitude: u64) -> i64 {
        let hash = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
        (hash % (2 * amplitude + 1)) as i64 - amplitude as i64
    }

    #[test]
    fn statistics_match_known_values() {
        assert!((standard_normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((standard_normal_cdf(1.959_964) - 0.975).abs() < 1e-6);
        assert!((standard_normal_cdf(-2.326_348) - 0.01).abs() < 1e-6);
        // n = 10 strictly increasing: S = 45, var = 125, z = 44 / 11.18.
        let rising: Vec<f64> = (0..10).map(f64::from).collect();
        let p = mann_kendall_p(&rising);
        assert!((p - (1.0 - standard_normal_cdf(44.0 / 125f64.sqrt()))).abs() < 1e-12);
        assert!(p < 1e-4);
        let falling: Vec<f64> = rising.iter().rev().copied().collect();
        assert_eq!(mann_kendall_p(&falling), 1.0);
        assert_eq!(mann_kendall_p(&[5.0; 8]), 1.0);
        // Ties shrink the variance: S = 24, variance (1176 - 4 * 18) / 18 instead of 1176 / 18.
        let tied = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0];
        let expected = 1.0 - standard_normal_cdf(23.0 / ((1176.0 - 72.0) / 18.0f64).sqrt());
        assert!((mann_kendall_p(&tied) - expected).abs() < 1e-12);
        assert_eq!(theil_sen(&[0.0, 1.0, 2.0], &[0.0, 2.0, 4.0]), 2.0);
        // One outlier does not move the median slope.
        let times: Vec<f64> = (0..9).map(f64::from).collect();
        let mut values: Vec<f64> = times.iter().map(|t| 3.0 * t).collect();
        values[4] = 1000.0;
        assert_eq!(theil_sen(&times, &values), 3.0);
        assert_eq!(theil_sen(&[1.0], &[1.0]), 0.0);
    }

    #[test]
    fn steady_growth_of_aging_objects_is_a_warning_then_critical() {
        let leak = series(10, 60.0, |i| {
            (1000 + 60 * i as u64, 600.0 + 60.0 * i as f64)
        });
        let judged = judge(&leak, &Thresholds::default()).expect("a leak");
        assert_eq!(judged.severity, Severity::Warning);
        assert!((judged.objects_per_second - 1.0).abs() < 1e-9);
        assert!((judged.bytes_per_second - 64.0).abs() < 1e-9);
        assert_eq!((judged.grown_objects, judged.grown_bytes), (540, 540 * 64));
        assert!(judged.aging && !judged.levelled_off);
        assert!(judged.confidence > 0.999);
        let long = Thresholds {
            critical_seconds: 500.0,
            ..Thresholds::default()
        };
        assert_eq!(judge(&leak, &long).unwrap().severity, Severity::Critical);
        let small = Thresholds {
            critical_bytes: 540 * 64,
            ..Thresholds::default()
        };
        assert_eq!(judge(&leak, &small).unwrap().severity, Severity::Critical);
    }

    #[test]
    fn a_noisy_leak_among_churn_is_found() {
        // 10 objects a minute on top of a pool of 5,000 that churns by ±200.
        let noisy = series(20, 60.0, |i| {
            let count = 5000 + 10 * i as i64 + jitter(i, 200) / 40;
            (count as u64, 300.0 + 60.0 * i as f64)
        });
        let judged = judge(&noisy, &Thresholds::default()).expect("a leak");
        assert_eq!(judged.severity, Severity::Warning, "{judged:?}");
        assert!((judged.objects_per_second - 10.0 / 60.0).abs() < 0.05);
    }

    #[test]
    fn too_few_points_or_too_little_growth_say_nothing() {
        let short = series(3, 60.0, |i| (100 * i as u64, 60.0 * i as f64));
        assert_eq!(judge(&short, &Thresholds::default()), None);
        let tiny = series(10, 60.0, |i| (100 + (i as u64) / 2, 60.0 * i as f64));
        assert_eq!(judge(&tiny, &Thresholds::default()), None);
        // Significant, but not yet long enough for a warning.
        let young = series(5, 60.0, |i| (100 + 50 * i as u64, 60.0 * i as f64));
        let judged = judge(
            &young,
            &Thresholds {
                significance: 0.05,
                ..Thresholds::default()
            },
        );
        assert_eq!(judged.map(|judged| judged.severity), Some(Severity::Info));
    }

    #[test]
    fn warm_up_that_plateaus_is_not_a_leak() {
        // A cache fills for four minutes, then holds 4,000 objects that it keeps.
        let warm_up = series(16, 60.0, |i| ((1000 * i as u64).min(4000), 60.0 * i as f64));
        let judged = judge(&warm_up, &Thresholds::default());
        assert!(
            judged.is_none_or(|judged| judged.severity == Severity::Info && judged.levelled_off),
            "{judged:?}"
        );
        // A leak that stopped is the same series: no warning once it has levelled off.
        let stopped = series(16, 60.0, |i| {
            (100 + 40 * i.min(6) as u64, 600.0 + 60.0 * i as f64)
        });
        let judged = judge(&stopped, &Thresholds::default()).expect("it grew");
        assert_eq!(judged.severity, Severity::Info);
        assert!(judged.levelled_off && judged.aging);
    }

    #[test]
    fn a_pool_whose_members_are_replaced_is_not_a_leak() {
        // The pool grows slowly with load, but its oldest member is never older than ten
        // minutes: the objects are freed and replaced.
        let pool = series(20, 60.0, |i| {
            (2000 + 5 * i as u64, (120.0 + 60.0 * i as f64) % 600.0)
        });
        let judged = judge(&pool, &Thresholds::default()).expect("it grows");
        assert_eq!(judged.severity, Severity::Info);
        assert!(!judged.aging);
        assert!(judged.confidence <= 0.5);
    }

    #[test]
    fn growth_younger_than_the_settle_time_is_not_a_leak() {
        // Closed epolls, freed by kfree_rcu: at 1-second intervals they pile up and age for
        // about ten seconds before their batch is drained.
        let deferred = series(9, 1.0, |i| (100 * (i as u64 + 1), i as f64 + 0.5));
        let judged = judge(&deferred, &Thresholds::default()).expect("it grows");
        assert_eq!(judged.severity, Severity::Info);
        assert!(judged.aging && !judged.settled && !judged.levelled_off);
        assert!(judged.confidence <= 0.5);
        // The same series is a leak once its oldest object has outlived the settle time.
        let settled = series(9, 1.0, |i| (100 * (i as u64 + 1), 30.0 + i as f64));
        let judged = judge(&settled, &Thresholds::default()).expect("it grows");
        assert_eq!(judged.severity, Severity::Warning);
        assert!(judged.settled && judged.confidence > 0.99);
        // A settle time just above the oldest age holds it back again.
        let strict = Thresholds {
            settle_seconds: 38.5,
            ..Thresholds::default()
        };
        assert_eq!(judge(&settled, &strict).unwrap().severity, Severity::Info);
    }

    #[test]
    fn boundaries_of_the_verdict() {
        // Exactly min_points, and exactly min_growth_objects, are judged.
        let four = series(4, 60.0, |i| (100 + 100 * i as u64, 600.0 + 60.0 * i as f64));
        let loose = Thresholds {
            significance: 0.5,
            ..Thresholds::default()
        };
        assert!(judge(&four, &loose).is_some());
        assert_eq!(judge(&four[..3], &loose), None, "3 points are too few");
        let eight = series(9, 60.0, |i| (100 + i as u64, 600.0 + 60.0 * i as f64));
        let judged = judge(&eight, &Thresholds::default()).expect("grew by exactly 8");
        assert_eq!(judged.grown_objects, 8);
        assert_eq!(judged.seconds, 480.0);
        // The span is last minus first, wherever the series starts (a watch an hour old).
        let later: Vec<Point> = eight
            .iter()
            .map(|point| Point {
                at_seconds: point.at_seconds + 3600.0,
                ..*point
            })
            .collect();
        let judged_later = judge(&later, &Thresholds::default()).expect("the same growth");
        assert_eq!(judged_later.seconds, 480.0);
        assert!(judged_later.aging, "aged 480 s in 480 s");
        // An oldest object that stays as old is being replaced: not aging, however old.
        let replaced = series(10, 60.0, |i| (1000 + 60 * i as u64, 1000.0));
        let judged = judge(&replaced, &Thresholds::default()).expect("it grows");
        assert!(!judged.aging && judged.severity == Severity::Info);
    }

    #[test]
    fn theil_sen_ignores_equal_times_and_averages_an_even_middle() {
        // Six slopes, sorted [1, 1, 1, 2, 2.5, 4]: the median is (1 + 2) / 2.
        assert_eq!(theil_sen(&[0.0, 1.0, 2.0, 3.0], &[0.0, 1.0, 2.0, 6.0]), 1.5);
        // A second point at the same time adds no slope (no division by zero): the slopes are
        // 2 and -3.
        assert_eq!(theil_sen(&[0.0, 0.0, 1.0], &[0.0, 5.0, 2.0]), -0.5);
    }

    #[test]
    fn mann_kendall_needs_three_values_and_corrects_longer_ties() {
        assert_eq!(mann_kendall_p(&[1.0, 2.0]), 1.0);
        assert!(mann_kendall_p(&[1.0, 2.0, 3.0]) < 1.0);
        // A run of three equal values: S = 33 (36 pairs, 3 tied), variance (9 * 8 * 23 - 3 * 2 * 11) / 18.
        let tied = [1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
        let expected =
            1.0 - standard_normal_cdf((33.0 - 1.0) / ((9.0 * 8.0 * 23.0 - 66.0) / 18.0f64).sqrt());
        assert!((mann_kendall_p(&tied) - expected).abs() < 1e-12);
    }

    #[test]
    fn verdicts_stored_before_settling_existed_read_as_settled() {
        let stored = r#"{"severity":"warning","confidence":0.99,"objects_per_second":1.0,
            "bytes_per_second":64.0,"grown_objects":60,"grown_bytes":3840,"seconds":60.0,
            "points":10,"aging":true,"levelled_off":false}"#;
        let judged: Judgement = serde_json::from_str(stored).expect("an old verdict");
        assert!(judged.settled && !judged.frees_unseen);
    }

    #[test]
    fn duty_cycled_sites_whose_frees_go_unseen_are_info() {
        let mut series = series(9, 60.0, |i| (100 * (i as u64 + 1), 60.0 + 60.0 * i as f64));
        let duty_cycled = Thresholds {
            duty_cycled: true,
            ..Thresholds::default()
        };
        assert_eq!(
            judge(&series, &duty_cycled).unwrap().severity,
            Severity::Warning
        );
        series[4].found_free = 3;
        let judged = judge(&series, &duty_cycled).unwrap();
        assert_eq!(judged.severity, Severity::Info);
        assert!(judged.frees_unseen && judged.aging && judged.settled);
        // Followed all the time, a slot taken again is seen: the objects found free do not
        // change the verdict.
        let judged = judge(&series, &Thresholds::default()).unwrap();
        assert_eq!(judged.severity, Severity::Warning);
        assert!(!judged.frees_unseen);
    }

    #[test]
    fn churn_and_a_sawtooth_are_not_growth() {
        let churn = series(30, 10.0, |i| ((3000 + jitter(i, 300)) as u64, 5.0));
        assert_eq!(judge(&churn, &Thresholds::default()), None);
        // Fills for five intervals, then is emptied, again and again.
        let sawtooth = series(30, 10.0, |i| (100 * (i % 5) as u64, 10.0 * (i % 5) as f64));
        assert_eq!(judge(&sawtooth, &Thresholds::default()), None);
        let shrinking = series(10, 60.0, |i| (1000 - 50 * i as u64, 60.0 * i as f64));
        assert_eq!(judge(&shrinking, &Thresholds::default()), None);
    }
}
