//! What every simulated device does, whichever cloud carries it: the readings it sends
//! (a temperature that drifts and sometimes spikes over the sample rule's threshold), how
//! it answers a command (ok, or a refusal with a reason at `refuse_rate`), the properties
//! it reports, and the fleet's counters the summary is made of.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Reasons a device gives when it refuses a command.
const REFUSALS: &[&str] = &[
    "compressor interlock open",
    "defrost cycle running; try again in 5 minutes",
    "valve stuck",
    "parameter out of range for this model",
];

/// The reading a device sends at step `n`: each device spikes on a schedule (two readings
/// in a row over 75 C, first after about 5 readings, then every 30) so the sample rule
/// shows an alert and its debounced child within seconds, plus occasional random spikes.
pub fn reading(temp: &mut f64, n: u64, index: usize, rng: &mut impl Rng) -> Value {
    let phase = (n + 30 - (index as u64 * 2) % 30) % 30;
    *temp += rng.gen_range(-0.6..0.6) + (62.0 - *temp) * 0.1;
    let spiking = phase == 5 || phase == 6 || rng.gen_bool(0.01);
    let t = if spiking {
        76.0 + rng.gen_range(0.5..8.0)
    } else {
        *temp
    };
    json!({
        "message_id": uuid::Uuid::new_v4().to_string(),
        "temperature": (t * 10.0).round() / 10.0,
        "humidity": ((40.0 + rng.gen_range(-5.0..5.0_f64)) * 10.0).round() / 10.0,
        "vibration_mm_s": (rng.gen_range(0.5..3.0_f64) * 100.0).round() / 100.0,
        "ts": chrono::Utc::now().to_rfc3339(),
    })
}

/// How a device answers one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Done.
    Ok,
    /// Refused, with the reason the gateway stores on the command.
    Refused(String),
}

impl Answer {
    /// `ok` or `error`, as every provider's reply format has it.
    pub fn status(&self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused(_) => "error",
        }
    }

    /// The refusal's reason.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Ok => None,
            Self::Refused(r) => Some(r),
        }
    }

    /// The JSON reply of the MQTT-based providers:
    /// `{"correlation_id", "status": "ok"|"error", "reason"?}`.
    pub fn reply_json(&self, correlation_id: &str) -> Value {
        let mut v = json!({"correlation_id": correlation_id, "status": self.status()});
        if let Some(r) = self.reason() {
            v["reason"] = json!(r);
        }
        v
    }
}

/// One device's state: its temperature, its step, its random source and its answer
/// policy.
#[derive(Debug)]
pub struct Behaviour {
    index: usize,
    temp: f64,
    n: u64,
    rng: StdRng,
    refuse_rate: f64,
    started: Instant,
}

impl Behaviour {
    /// The `index`-th device of the fleet (its spikes are staggered by index), refusing
    /// commands at `refuse_rate` (0 to 1).
    pub fn new(index: usize, refuse_rate: f64) -> Self {
        Self {
            index,
            temp: 60.0 + index as f64,
            n: 0,
            rng: StdRng::from_entropy(),
            refuse_rate: refuse_rate.clamp(0.0, 1.0),
            started: Instant::now(),
        }
    }

    /// The next reading.
    pub fn next_reading(&mut self) -> Value {
        self.n += 1;
        reading(&mut self.temp, self.n, self.index, &mut self.rng)
    }

    /// Whether the reported properties are due after this reading (the first, then
    /// every 30th).
    pub fn report_due(&self) -> bool {
        self.n == 1 || self.n.is_multiple_of(30)
    }

    /// The reported properties (what a chiller's firmware would tell).
    pub fn properties(&self) -> Value {
        json!({
            "firmware": "1.4.2",
            "model": "sim-chiller-2",
            "setpoint_celsius": 60,
            "uptime_s": self.started.elapsed().as_secs(),
            "readings_sent": self.n,
        })
    }

    /// Answers `command` (the JSON the device received): refused at the configured rate;
    /// an accepted `cool_down` brings the temperature down.
    pub fn answer(&mut self, command: &Value) -> Answer {
        if self.refuse_rate > 0.0 && self.rng.gen_bool(self.refuse_rate) {
            let r = REFUSALS[self.rng.gen_range(0..REFUSALS.len())];
            return Answer::Refused(r.to_owned());
        }
        if command.get("CommandName").and_then(Value::as_str) == Some("cool_down") {
            self.temp = 58.0;
        }
        Answer::Ok
    }
}

/// The fleet's counters, shared by every device task.
#[derive(Debug, Default)]
pub struct Counters {
    /// Devices connected at least once.
    pub connected: AtomicU64,
    /// Readings the cloud accepted (MQTT: queued to a live connection; Pub/Sub: published).
    pub sent: AtomicU64,
    /// Commands received.
    pub commands: AtomicU64,
    /// Commands answered ok.
    pub answered_ok: AtomicU64,
    /// Commands refused (answered with a reason).
    pub refused: AtomicU64,
    /// Reported-properties updates sent.
    pub reported: AtomicU64,
    /// Errors (connection refused or lost, a publish that failed, a command that could
    /// not be answered).
    pub errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Counters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Counts an error of `device` and keeps it as the last one (for the summary).
    pub fn error(&self, device: &str, what: impl std::fmt::Display) {
        Self::bump(&self.errors);
        tracing::debug!(device, error = %what, "simulated device error");
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *last = Some(format!("{device}: {what}"));
    }

    /// The last error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts an answer.
    pub fn answered(&self, answer: &Answer) {
        match answer {
            Answer::Ok => Self::bump(&self.answered_ok),
            Answer::Refused(_) => Self::bump(&self.refused),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_spikes_twice_in_a_row_early_and_stays_realistic_otherwise() {
        let mut rng = StdRng::seed_from_u64(7);
        for index in 0..3 {
            let mut temp = 60.0;
            let temps: Vec<f64> = (1..=12)
                .map(|n| {
                    reading(&mut temp, n, index, &mut rng)["temperature"]
                        .as_f64()
                        .expect("number")
                })
                .collect();
            let over: Vec<usize> = temps
                .iter()
                .enumerate()
                .filter(|(_, t)| **t > 75.0)
                .map(|(i, _)| i + 1)
                .collect();
            assert!(
                over.windows(2).any(|w| w[1] == w[0] + 1),
                "device {index}: {temps:?}"
            );
            assert!(temps.iter().all(|t| (40.0..90.0).contains(t)), "{temps:?}");
        }
    }

    #[test]
    fn commands_are_refused_at_the_configured_rate_with_a_reason() {
        let cmd = json!({"CommandName": "reboot"});
        let mut never = Behaviour::new(0, 0.0);
        assert!((0..200).all(|_| never.answer(&cmd) == Answer::Ok));
        let mut always = Behaviour::new(0, 1.0);
        let a = always.answer(&cmd);
        assert_eq!(a.status(), "error");
        assert!(REFUSALS.contains(&a.reason().expect("a reason")));
        assert_eq!(
            a.reply_json("c-1"),
            json!({"correlation_id": "c-1", "status": "error", "reason": a.reason()})
        );
        let mut some = Behaviour::new(0, 0.1);
        let refused = (0..2000)
            .filter(|_| some.answer(&cmd) != Answer::Ok)
            .count();
        assert!((100..320).contains(&refused), "{refused} of 2000");
    }

    #[test]
    fn an_accepted_cool_down_lowers_the_temperature_and_properties_are_due_first_then_every_30() {
        let mut b = Behaviour::new(2, 0.0);
        b.temp = 70.0;
        assert_eq!(b.answer(&json!({"CommandName": "cool_down"})), Answer::Ok);
        assert!((b.temp - 58.0).abs() < f64::EPSILON);
        let mut due = Vec::new();
        for _ in 1..=61 {
            b.next_reading();
            if b.report_due() {
                due.push(b.n);
            }
        }
        assert_eq!(due, [1, 30, 60]);
        assert_eq!(b.properties()["readings_sent"], 61);
    }
}
