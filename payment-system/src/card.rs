//! Cards: a number that cannot show itself, and the checks a card must pass.
//!
//! A [`CardNumber`] is checked (13 to 19 digits, Luhn) when parsed and can only ever print its
//! first six and last four digits, in `Debug`, `Display` and serialisation alike. The full number
//! leaves it only through [`CardNumber::expose`], for the gateway call.

use std::fmt;

use chrono::{DateTime, Datelike, Utc};
use serde::{Serialize, Serializer};

/// A validated card number.
#[derive(Clone, PartialEq, Eq)]
pub struct CardNumber(String);

/// Why a card was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    /// Not 13 to 19 digits.
    #[error("card number must be 13 to 19 digits")]
    Length,
    /// Failed the Luhn check.
    #[error("card number is not valid (check digit)")]
    Luhn,
    /// Month not 1..=12.
    #[error("exp_month must be from 1 to 12")]
    Month,
    /// Year not a four-digit year.
    #[error("exp_year must be a four-digit year")]
    Year,
    /// The card expired.
    #[error("the card expired at the end of {month:02}/{year}")]
    Expired {
        /// Month.
        month: u32,
        /// Year.
        year: i32,
    },
    /// CVC not 3 or 4 digits.
    #[error("cvc must be 3 or 4 digits")]
    Cvc,
}

fn luhn_ok(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

impl CardNumber {
    /// Parses digits only (no spaces), 13 to 19 of them, Luhn-valid.
    pub fn parse(text: &str) -> Result<Self, CardError> {
        if !(13..=19).contains(&text.len()) || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CardError::Length);
        }
        if !luhn_ok(text) {
            return Err(CardError::Luhn);
        }
        Ok(Self(text.to_owned()))
    }

    /// The full number, for the gateway alone.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// First six and last four: `424242******4242`.
    pub fn masked(&self) -> String {
        let n = self.0.len();
        format!("{}{}{}", &self.0[..6], "*".repeat(n - 10), &self.0[n - 4..])
    }

    /// The last four digits.
    pub fn last4(&self) -> &str {
        &self.0[self.0.len() - 4..]
    }
}

impl fmt::Debug for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CardNumber({})", self.masked())
    }
}

impl fmt::Display for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl Serialize for CardNumber {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.masked())
    }
}

/// A validated card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    /// The number.
    pub number: CardNumber,
    /// Expiry month, 1..=12.
    pub exp_month: u32,
    /// Expiry year, four digits.
    pub exp_year: i32,
    /// The CVC, if sent; never stored or shown.
    pub cvc: Option<Cvc>,
}

/// A card verification code; prints as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Cvc(String);

impl Cvc {
    /// Parses 3 or 4 digits.
    pub fn parse(text: &str) -> Result<Self, CardError> {
        if (3..=4).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Self(text.to_owned()))
        } else {
            Err(CardError::Cvc)
        }
    }
    /// The code, for the gateway alone.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Cvc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cvc(***)")
    }
}

/// Checks an expiry: month 1..=12, a four-digit year, and not before `now`'s month (a card is
/// valid through the last day of its expiry month).
pub fn check_expiry(month: i64, year: i64, now: DateTime<Utc>) -> Result<(u32, i32), CardError> {
    let month = u32::try_from(month)
        .ok()
        .filter(|m| (1..=12).contains(m))
        .ok_or(CardError::Month)?;
    let year = i32::try_from(year)
        .ok()
        .filter(|y| (1000..=9999).contains(y))
        .ok_or(CardError::Year)?;
    if (year, month) < (now.year(), now.month()) {
        return Err(CardError::Expired { month, year });
    }
    Ok((month, year))
}

/// A card summary safe to store and show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CardSummary {
    /// First six and last four.
    pub masked: String,
    /// Last four digits.
    pub last4: String,
    /// Expiry month.
    pub exp_month: u32,
    /// Expiry year.
    pub exp_year: i32,
}

impl From<&Card> for CardSummary {
    fn from(c: &Card) -> Self {
        Self {
            masked: c.number.masked(),
            last4: c.number.last4().to_owned(),
            exp_month: c.exp_month,
            exp_year: c.exp_year,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn luhn_length_and_masking() {
        let n = CardNumber::parse("4242424242424242").expect("valid");
        assert_eq!(n.masked(), "424242******4242");
        assert_eq!(
            format!("{n:?} {n}"),
            "CardNumber(424242******4242) 424242******4242"
        );
        assert_eq!(
            serde_json::to_string(&n).expect("json"),
            "\"424242******4242\""
        );
        assert!(CardNumber::parse("4000000000000002").is_ok());
        assert!(CardNumber::parse("4000000000000119").is_ok());
        assert_eq!(CardNumber::parse("4242424242424241"), Err(CardError::Luhn));
        assert_eq!(CardNumber::parse("424242424242"), Err(CardError::Length));
        assert_eq!(
            CardNumber::parse("4242 4242 4242 4242"),
            Err(CardError::Length)
        );
        assert_eq!(
            CardNumber::parse("42424242424242424242"),
            Err(CardError::Length)
        );
        assert_eq!(format!("{:?}", Cvc::parse("123").expect("cvc")), "Cvc(***)");
    }

    #[test]
    fn expiry_is_valid_through_its_month() {
        let now = Utc
            .with_ymd_and_hms(2026, 11, 23, 0, 0, 0)
            .single()
            .expect("date");
        assert_eq!(check_expiry(11, 2026, now), Ok((11, 2026)));
        assert_eq!(
            check_expiry(10, 2026, now),
            Err(CardError::Expired {
                month: 10,
                year: 2026
            })
        );
        assert_eq!(check_expiry(13, 2030, now), Err(CardError::Month));
        assert_eq!(check_expiry(0, 2030, now), Err(CardError::Month));
        assert_eq!(check_expiry(1, 30, now), Err(CardError::Year));
    }
}
