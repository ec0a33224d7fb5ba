//! The benchmark's arithmetic: ratios paired by round, a distribution-free interval for their
//! median, and whether a target is shown to be met.
//!
//! A round runs every variant once, one after the other, so a variant's run and the
//! baseline's run of the same round are at most a round apart and see much the same machine
//! (its other tenants, the caches the workload fills). Their ratio cancels what drifts between
//! rounds, which a ratio of the two variants' medians over all rounds does not.

/// The median of `values` (NaN when there are none).
pub(crate) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => values[len / 2],
        len => (values[len / 2 - 1] + values[len / 2]) / 2.0,
    }
}

/// `numerators[i] / denominators[i]` for each round both have.
pub(crate) fn paired_ratios(numerators: &[f64], denominators: &[f64]) -> Vec<f64> {
    numerators
        .iter()
        .zip(denominators)
        .map(|(numerator, denominator)| numerator / denominator)
        .collect()
}

/// The median of per-round ratios and an interval that holds the true median with probability
/// at least `coverage` (whatever the distribution of the rounds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MedianInterval {
    pub low: f64,
    pub median: f64,
    pub high: f64,
    pub coverage: f64,
}

/// The order statistics `x(k)` and `x(n+1-k)` of `values` (sorted, 1-based), with the largest
/// `k` whose coverage of the median, `1 - 2 P(Binomial(n, 1/2) < k)`, is at least
/// `confidence`; when even the whole range falls short (few rounds), the whole range, with the
/// coverage it has. None for no values.
pub(crate) fn median_interval(values: &[f64], confidence: f64) -> Option<MedianInterval> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let mut k = 1;
    let mut coverage = coverage_of_order_statistics(n, 1);
    while 2 * (k + 1) <= n + 1 {
        let wider = coverage_of_order_statistics(n, k + 1);
        if wider < confidence {
            break;
        }
        k += 1;
        coverage = wider;
    }
    Some(MedianInterval {
        low: sorted[k - 1],
        median: median(sorted.iter().copied()),
        high: sorted[n - k],
        coverage,
    })
}

/// `1 - 2 P(B < k)` for `B ~ Binomial(n, 1/2)`: the chance that the median of the distribution
/// lies between the `k`th smallest and the `k`th largest of `n` draws.
fn coverage_of_order_statistics(n: usize, k: usize) -> f64 {
    // P(B = j) from P(B = 0) = 2^-n upwards; 2^-1000 is still a normal f64.
    let mut probability = 0.5f64.powi(n as i32);
    let mut below = 0.0;
    for j in 0..k {
        below += probability;
        probability *= (n - j) as f64 / (j + 1) as f64;
    }
    (1.0 - 2.0 * below).max(0.0)
}

/// Whether a run shows a ratio to be at most its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TargetVerdict {
    /// The whole interval is at or under the target.
    Met,
    /// The whole interval is above it.
    Missed,
    /// The interval straddles it: the rounds spread too much to tell.
    NotShown,
    /// The interval holds the median with less than the confidence asked for, whichever side
    /// of the target it lies (fewer than 5 rounds at 90%).
    TooFewRounds,
    /// A ratio over the floor whose interval reaches further below 1 than the target lies
    /// above it: the rounds spread more than the margin asked, and the interval is under the
    /// target only by chance.
    TooNoisy,
}

impl TargetVerdict {
    pub(crate) fn of(interval: &MedianInterval, at_most: f64, confidence: f64) -> Self {
        if interval.coverage < confidence {
            TargetVerdict::TooFewRounds
        } else if interval.high <= at_most {
            TargetVerdict::Met
        } else if interval.low > at_most {
            TargetVerdict::Missed
        } else {
            TargetVerdict::NotShown
        }
    }

    /// For a variant's ratio over the floor. The floor is the same binary with its programs
    /// returning at once, so the variant only adds work to it: a ratio under 1 is the
    /// machine's own swings within a round (a neighbour's load on the host), which pairing
    /// the rounds does not cancel. (A ratio over no tracer at all has no such bound: a tracer's
    /// threads can keep a VM's CPUs from idling and speed a latency-bound workload up.)
    pub(crate) fn over_floor(interval: &MedianInterval, at_most: f64, confidence: f64) -> Self {
        match Self::of(interval, at_most, confidence) {
            Self::TooFewRounds => Self::TooFewRounds,
            _ if interval.low < 1.0 - (at_most - 1.0) => Self::TooNoisy,
            verdict => verdict,
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            TargetVerdict::Met => "met",
            TargetVerdict::Missed => "missed",
            TargetVerdict::NotShown => "not shown",
            TargetVerdict::TooFewRounds => "too few rounds",
            TargetVerdict::TooNoisy => "too noisy",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_even_and_empty_series() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
    }

    #[test]
    fn ratios_pair_rounds_and_cancel_drift() {
        // The machine slows down by half over the rounds; the variant costs 10% throughout.
        let baseline = [100.0, 80.0, 60.0, 50.0];
        let variant = [100.0 / 1.1, 80.0 / 1.1, 60.0 / 1.1, 50.0 / 1.1];
        let ratios = paired_ratios(&baseline, &variant);
        assert_eq!(ratios.len(), 4);
        for ratio in &ratios {
            assert!((ratio - 1.1).abs() < 1e-12, "{ratio}");
        }
        // A round the variant has not run yet is left out.
        assert_eq!(paired_ratios(&baseline, &variant[..2]).len(), 2);
    }

    #[test]
    fn coverage_matches_the_binomial_tails() {
        // n = 5: [min, max] misses the median only when all five fall on one side.
        assert!((coverage_of_order_statistics(5, 1) - (1.0 - 2.0 / 32.0)).abs() < 1e-12);
        // n = 10, k = 2: 1 - 2 (1 + 10) / 1024.
        assert!((coverage_of_order_statistics(10, 2) - (1.0 - 22.0 / 1024.0)).abs() < 1e-12);
        // n = 1: a single draw says nothing.
        assert_eq!(coverage_of_order_statistics(1, 1), 0.0);
        // Large n stays finite.
        assert!(coverage_of_order_statistics(1000, 469) > 0.9);
    }

    #[test]
    fn intervals_narrow_with_rounds_and_keep_their_coverage() {
        let five = median_interval(&[1.3, 1.1, 1.2, 1.0, 1.4], 0.9).unwrap();
        assert_eq!((five.low, five.median, five.high), (1.0, 1.2, 1.4));
        assert!((five.coverage - 0.9375).abs() < 1e-12);

        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        let interval = median_interval(&ten, 0.9).unwrap();
        // k = 2 covers 97.9%; k = 3 covers 89.1%, under 90%.
        assert_eq!((interval.low, interval.high), (2.0, 9.0));
        assert!(interval.coverage >= 0.9);
        let interval = median_interval(&ten, 0.85).unwrap();
        assert_eq!((interval.low, interval.high), (3.0, 8.0));

        // Three rounds cannot reach 90%: the whole range, with the 75% it has.
        let three = median_interval(&[2.0, 1.0, 3.0], 0.9).unwrap();
        assert_eq!((three.low, three.high), (1.0, 3.0));
        assert!((three.coverage - 0.75).abs() < 1e-12);

        assert_eq!(median_interval(&[], 0.9), None);
    }

    /// An interval from `low` to `high` that holds the median with the 90% the tests ask for.
    fn interval(low: f64, high: f64) -> MedianInterval {
        MedianInterval {
            low,
            median: (low + high) / 2.0,
            high,
            coverage: 0.9,
        }
    }

    #[test]
    fn a_target_is_met_only_when_the_whole_interval_is_under_it() {
        assert_eq!(
            TargetVerdict::of(&interval(1.01, 1.05), 1.05, 0.9),
            TargetVerdict::Met
        );
        assert_eq!(
            TargetVerdict::of(&interval(1.06, 1.2), 1.05, 0.9),
            TargetVerdict::Missed
        );
        assert_eq!(
            TargetVerdict::of(&interval(1.0, 1.1), 1.05, 0.9),
            TargetVerdict::NotShown
        );
    }

    #[test]
    fn over_the_floor_rounds_faster_than_the_floor_by_more_than_the_margin_judge_nothing() {
        // Recorded: 20 rounds of churn while the host's load swung the baseline from 199,035
        // to 343,904 ops/s; the whole interval is under 1.10x, by chance.
        let swung = interval(0.73, 1.06);
        assert_eq!(TargetVerdict::of(&swung, 1.10, 0.9), TargetVerdict::Met);
        assert_eq!(
            TargetVerdict::over_floor(&swung, 1.10, 0.9),
            TargetVerdict::TooNoisy
        );
        assert_eq!(
            TargetVerdict::over_floor(&interval(0.97, 1.02), 1.02, 0.9),
            TargetVerdict::TooNoisy
        );
        // Within the margin below 1, the verdict is the interval's.
        assert_eq!(
            TargetVerdict::over_floor(&interval(0.99, 1.01), 1.02, 0.9),
            TargetVerdict::Met
        );
        assert_eq!(
            TargetVerdict::over_floor(&interval(0.98, 1.03), 1.02, 0.9),
            TargetVerdict::NotShown
        );
        assert_eq!(
            TargetVerdict::over_floor(&interval(1.11, 1.18), 1.10, 0.9),
            TargetVerdict::Missed
        );
        // Too few rounds says so first.
        let three = median_interval(&[0.7, 1.0, 1.05], 0.9).unwrap();
        assert_eq!(
            TargetVerdict::over_floor(&three, 1.10, 0.9),
            TargetVerdict::TooFewRounds
        );
    }

    #[test]
    fn a_single_round_shows_no_target_either_way() {
        let one = median_interval(&[1.01], 0.9).unwrap();
        assert_eq!(
            TargetVerdict::of(&one, 1.05, 0.9),
            TargetVerdict::TooFewRounds
        );
        let three = median_interval(&[1.3, 1.2, 1.25], 0.9).unwrap();
        assert_eq!(
            TargetVerdict::of(&three, 1.05, 0.9),
            TargetVerdict::TooFewRounds
        );
        let five = median_interval(&[1.3, 1.2, 1.25, 1.21, 1.22], 0.9).unwrap();
        assert_eq!(TargetVerdict::of(&five, 1.05, 0.9), TargetVerdict::Missed);
    }
}
