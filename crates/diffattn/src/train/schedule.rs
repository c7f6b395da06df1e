//! Learning-rate schedules (transformers' `get_scheduler` semantics), the negative-branch
//! warm-up `mix` (docs/spec.md §5-6) and the choice of monitored layers (docs/spec.md §5-6).

/// `lr_scheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// Linear warm-up, then cosine decay to 0 at the last step
    /// (`get_cosine_schedule_with_warmup`, half a cycle).
    Cosine,
    /// Linear warm-up, then linear decay to 0 (`get_linear_schedule_with_warmup`).
    Linear,
    /// Constant; with `warmup_steps`, linear warm-up first
    /// (`get_constant_schedule_with_warmup`).
    Constant,
}

impl Scheduler {
    /// Parses axolotl's `lr_scheduler` value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cosine" => Some(Scheduler::Cosine),
            "linear" => Some(Scheduler::Linear),
            "constant" | "constant_with_warmup" => Some(Scheduler::Constant),
            _ => None,
        }
    }

    /// Multiplier of the base learning rate for optimizer step `step` (0-based) of `total`,
    /// with `warmup` warm-up steps. Same formulas as transformers' `optimization.py`.
    pub fn factor(self, step: usize, total: usize, warmup: usize) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        match self {
            Scheduler::Constant => 1.0,
            Scheduler::Linear => ((total as f64 - step as f64)
                / (total.saturating_sub(warmup)).max(1) as f64)
                .max(0.0),
            Scheduler::Cosine => {
                let progress =
                    (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

/// Warm-up factor of the negative branch before optimizer step `g` (completed steps):
/// `min(1, g / warmup_steps)`, 1 without warm-up (docs/spec.md §5-6).
pub fn mix(g: usize, warmup_steps: Option<usize>) -> f64 {
    match warmup_steps {
        Some(w) if w > 0 => (g as f64 / w as f64).min(1.0),
        _ => 1.0,
    }
}

/// The monitored layers: k = min(num_monitor_layers, L); layer `round(i·(L−1)/(k−1))` for
/// i < k with round-half-to-even (docs/spec.md §5-6; the plugin uses Python's `round`).
pub fn monitored_layers(num_layers: usize, num_monitor_layers: usize) -> Vec<usize> {
    let k = num_monitor_layers.min(num_layers);
    if k == 0 {
        return Vec::new();
    }
    if k == 1 {
        return vec![0];
    }
    let stride = (num_layers - 1) as f64 / (k - 1) as f64;
    (0..k)
        .map(|i| (i as f64 * stride).round_ties_even() as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitored_layers_round_half_to_even() {
        assert_eq!(monitored_layers(30, 3), vec![0, 14, 29]);
        assert_eq!(monitored_layers(30, 1), vec![0]);
        assert_eq!(monitored_layers(2, 5), vec![0, 1]);
        // Ties go to the even neighbour (Python's round): 1.5 -> 2, 2.5 -> 2, 3.5 -> 4.
        assert_eq!(monitored_layers(4, 3), vec![0, 2, 3]);
        assert_eq!(monitored_layers(6, 3), vec![0, 2, 5]);
        assert_eq!(monitored_layers(8, 3), vec![0, 4, 7]);
        assert!(monitored_layers(6, 0).is_empty());
    }

    #[test]
    fn mix_is_linear_then_one() {
        assert_eq!(mix(0, Some(4)), 0.0);
        assert_eq!(mix(1, Some(4)), 0.25);
        assert_eq!(mix(4, Some(4)), 1.0);
        assert_eq!(mix(9, Some(4)), 1.0);
        assert_eq!(mix(0, None), 1.0);
    }

    #[test]
    fn schedules_match_transformers() {
        // Values of transformers' get_{linear,cosine,constant}_schedule_with_warmup(
        // num_warmup_steps=2, num_training_steps=10) lr_lambda at steps 0, 1, 2, 6, 9, 10.
        let steps = [0, 1, 2, 6, 9, 10];
        let lin: Vec<f64> = steps
            .iter()
            .map(|&s| Scheduler::Linear.factor(s, 10, 2))
            .collect();
        assert_eq!(lin, vec![0.0, 0.5, 1.0, 0.5, 0.125, 0.0]);
        let cos: Vec<f64> = steps
            .iter()
            .map(|&s| Scheduler::Cosine.factor(s, 10, 2))
            .collect();
        let expect = [0.0, 0.5, 1.0, 0.5, 0.03806023374435663, 0.0];
        for (a, b) in cos.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12, "{cos:?}");
        }
        let con: Vec<f64> = steps
            .iter()
            .map(|&s| Scheduler::Constant.factor(s, 10, 2))
            .collect();
        assert_eq!(con, vec![0.0, 0.5, 1.0, 1.0, 1.0, 1.0]);
    }
}
