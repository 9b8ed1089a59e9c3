//! Time windows: `"mon-fri 08:00-18:00 Europe/Paris"`, weekdays and a time-of-day range
//! in an explicit IANA time zone (the zone database is bundled: see Cargo.toml).

use std::fmt;

use jiff::{Timestamp, civil::Weekday, tz::TimeZone};

/// One window. Matches an instant whose local weekday (in `tz`) is one of `days` and
/// whose local time of day is in `[start, end)`; a range that ends at or before it
/// starts runs past midnight (`22:00-06:00`: from 22:00 on the listed day to 06:00 the
/// next morning). `00:00-24:00` is the whole day.
#[derive(Clone)]
pub struct Window {
    /// Bit 0: Monday ... bit 6: Sunday.
    days: u8,
    /// Minutes since midnight.
    start: u16,
    end: u16,
    tz: TimeZone,
    /// As written, for messages.
    text: String,
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq for Window {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

const DAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// A day, abbreviated (`mon`) or in full (`monday`): 0 for Monday.
fn day(s: &str) -> Result<u8, String> {
    let lower = s.to_ascii_lowercase();
    DAYS.iter()
        .position(|d| *d == lower || d[..3] == lower)
        .map(|i| i as u8)
        .ok_or_else(|| format!("unknown day {s:?} (mon, tue, ... sun)"))
}

/// `mon-fri`, `sat,sun`, `mon,wed-fri`, `*` or `daily`.
fn days(s: &str) -> Result<u8, String> {
    if s == "*" || s.eq_ignore_ascii_case("daily") {
        return Ok(0x7f);
    }
    let mut set = 0u8;
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    set |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => set |= 1 << day(part)?,
        }
    }
    Ok(set)
}

/// `HH:MM` (`24:00` allowed as an end).
fn clock(s: &str, end: bool) -> Result<u16, String> {
    let bad = || format!("invalid time {s:?} (HH:MM, 00:00 to 24:00)");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    match (h, m) {
        (24, 0) if end => Ok(24 * 60),
        (0..=23, 0..=59) => Ok(h * 60 + m),
        _ => Err(bad()),
    }
}

impl Window {
    /// Parse `DAYS HH:MM-HH:MM ZONE`.
    ///
    /// # Errors
    /// What is wrong, in words.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [d, range, zone] = parts.as_slice() else {
            return Err(
                "a window is \"DAYS HH:MM-HH:MM ZONE\", e.g. \"mon-fri 08:00-18:00 Europe/Paris\""
                    .to_owned(),
            );
        };
        let days = days(d)?;
        let (a, b) = range
            .split_once('-')
            .ok_or_else(|| format!("invalid hours {range:?} (HH:MM-HH:MM)"))?;
        let (start, end) = (clock(a, false)?, clock(b, true)?);
        if start == end {
            return Err(format!("empty hours {range:?}"));
        }
        let tz = TimeZone::get(zone).map_err(|_| {
            format!("unknown time zone {zone:?} (an IANA name such as Europe/Paris, or UTC)")
        })?;
        Ok(Self {
            days,
            start,
            end,
            tz,
            text: parts.join(" "),
        })
    }

    /// Whether `now` falls in the window.
    #[must_use]
    pub fn contains(&self, now: Timestamp) -> bool {
        let local = now.to_zoned(self.tz.clone());
        let minute =
            u16::from(local.hour().unsigned_abs()) * 60 + u16::from(local.minute().unsigned_abs());
        let today = weekday_index(local.weekday());
        if self.start < self.end {
            self.days & (1 << today) != 0 && minute >= self.start && minute < self.end
        } else {
            // Past midnight: the evening of a listed day, or the morning after one.
            let yesterday = (today + 6) % 7;
            (self.days & (1 << today) != 0 && minute >= self.start)
                || (self.days & (1 << yesterday) != 0 && minute < self.end)
        }
    }
}

fn weekday_index(w: Weekday) -> u8 {
    w.to_monday_zero_offset().unsigned_abs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn weekdays_hours_and_zones() {
        let w = Window::parse("mon-fri 08:00-18:00 Europe/Paris").unwrap();
        // Monday 2026-11-30 09:00 in Paris is 08:00 UTC.
        assert!(w.contains(at("2026-11-30T08:00:00Z")));
        assert!(!w.contains(at("2026-11-30T06:59:00Z")), "07:59 Paris");
        assert!(
            !w.contains(at("2026-11-30T17:00:00Z")),
            "18:00 Paris: end excluded"
        );
        assert!(!w.contains(at("2026-12-05T10:00:00Z")), "Saturday");
        let night = Window::parse("fri 22:00-06:00 UTC").unwrap();
        assert!(night.contains(at("2026-12-04T23:00:00Z")), "Friday night");
        assert!(
            night.contains(at("2026-12-05T05:59:00Z")),
            "Saturday morning"
        );
        assert!(
            !night.contains(at("2026-12-05T23:00:00Z")),
            "Saturday night"
        );
        let always = Window::parse("* 00:00-24:00 UTC").unwrap();
        assert!(always.contains(at("2026-12-06T23:59:59Z")));
        let some = Window::parse("sat,sun,wed 10:00-12:00 America/New_York").unwrap();
        assert!(
            some.contains(at("2026-12-02T15:30:00Z")),
            "Wednesday 10:30 EST"
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (text, needle) in [
            ("mon-fri 08:00-18:00", "DAYS HH:MM-HH:MM ZONE"),
            ("moon 08:00-18:00 UTC", "unknown day"),
            ("mon 8:00-18:00 UTC", "invalid time"),
            ("mon 08:00-25:00 UTC", "invalid time"),
            ("mon 08:00-08:00 UTC", "empty hours"),
            ("mon 08:00-18:00 Mars/Olympus", "unknown time zone"),
        ] {
            let e = Window::parse(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
