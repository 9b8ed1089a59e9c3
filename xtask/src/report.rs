//! What every benchmark measures, as rows `cargo xtask bench all` gathers into one
//! markdown table and one chart. Each benchmark module prints its own table when run
//! alone and returns its rows for `all`.

/// One measured path of one workload.
#[derive(Debug, Clone)]
pub struct Row {
    /// The workload, as the table's first column: `PG new conn/txn (pgbench -S -C -c 8)`.
    pub workload: String,
    /// The path measured: `direct`, `haproxy`, `nginx`, `pgbouncer transaction`,
    /// `broker`, `broker, reuse: session`, ...
    pub path: String,
    /// The median of the rounds, in `unit`.
    pub value: f64,
    /// `tps`, `req/s`, `MB/s`, `KiB`, `us`, ...
    pub unit: &'static str,
    /// `value` over the baseline's (direct) of the same workload, when the workload
    /// has one; `None` for the baseline itself and for absolute figures (memory).
    pub ratio: Option<f64>,
    /// The lowest and highest per-round ratio, when there were rounds.
    pub range: Option<(f64, f64)>,
    /// Whether a higher value is better (throughput) or worse (latency, memory).
    pub higher_is_better: bool,
    /// The target for this row, as text (`>= 0.95x`), if it has one.
    pub target: Option<String>,
}

impl Row {
    /// A baseline row (ratio 1 by definition, shown as `1.00x`).
    pub fn baseline(workload: &str, path: &str, value: f64, unit: &'static str) -> Row {
        Row {
            workload: workload.to_owned(),
            path: path.to_owned(),
            value,
            unit,
            ratio: None,
            range: None,
            higher_is_better: true,
            target: None,
        }
    }

    /// A row compared with its workload's baseline: the ratio of medians and the range
    /// of the per-round ratios (`runs` and `base` are the per-round values, paired).
    pub fn compared(
        workload: &str,
        path: &str,
        runs: &[f64],
        base: &[f64],
        unit: &'static str,
    ) -> Row {
        let value = crate::bench::median(runs);
        let b = crate::bench::median(base);
        let ratios: Vec<f64> = runs.iter().zip(base).map(|(r, d)| r / d).collect();
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        Row {
            workload: workload.to_owned(),
            path: path.to_owned(),
            value,
            unit,
            ratio: (b > 0.0).then(|| value / b),
            range: (ratios.len() > 1).then_some((lo, hi)),
            higher_is_better: true,
            target: None,
        }
    }

    /// An absolute figure with no baseline (memory, per-connection cost).
    pub fn absolute(workload: &str, path: &str, value: f64, unit: &'static str) -> Row {
        Row {
            higher_is_better: false,
            ..Row::baseline(workload, path, value, unit)
        }
    }

    pub fn target(mut self, t: &str) -> Row {
        self.target = Some(t.to_owned());
        self
    }
}
