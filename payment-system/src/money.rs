//! Money: exact amounts in a currency's minor units.
//!
//! An amount arrives as a JSON number or string and becomes a [`rust_decimal::Decimal`] straight
//! from its text (the JSON parser keeps numbers as written), so `99.99` is exactly 99.99 from the
//! wire to the store and back. A currency's minor units (USD 2, JPY 0, KWD 3) bound the fraction
//! digits the amount may have; amounts are positive and at most a configured maximum.

use std::str::FromStr;

use rust_decimal::Decimal;

/// An ISO 4217 currency this service accepts, with its minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: &'static str,
    minor_units: u32,
}

/// Every supported ISO 4217 code, upper case.
pub fn currency_codes() -> impl Iterator<Item = &'static str> {
    CURRENCIES.iter().map(|(code, _)| *code)
}

/// ISO 4217 codes with their number of minor units.
const CURRENCIES: &[(&str, u32)] = &[
    ("AED", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("BDT", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EGP", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KES", 2),
    ("KRW", 0),
    ("KWD", 3),
    ("MAD", 2),
    ("MXN", 2),
    ("MYR", 2),
    ("NGN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PEN", 2),
    ("PHP", 2),
    ("PKR", 2),
    ("PLN", 2),
    ("PYG", 0),
    ("QAR", 2),
    ("RON", 2),
    ("RSD", 2),
    ("SAR", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TND", 3),
    ("TRY", 2),
    ("TWD", 2),
    ("UAH", 2),
    ("UGX", 0),
    ("USD", 2),
    ("UYU", 2),
    ("VND", 0),
    ("XAF", 0),
    ("XOF", 0),
    ("ZAR", 2),
];

impl Currency {
    /// Looks a code up, in any case.
    pub fn parse(code: &str) -> Option<Self> {
        let upper = code.to_ascii_uppercase();
        CURRENCIES
            .iter()
            .find(|(c, _)| *c == upper)
            .map(|(code, minor_units)| Currency {
                code,
                minor_units: *minor_units,
            })
    }

    /// The upper-case code.
    pub fn code(self) -> &'static str {
        self.code
    }

    /// Digits after the decimal point this currency has.
    pub fn minor_units(self) -> u32 {
        self.minor_units
    }
}

/// Why an amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// Not a plain decimal number.
    #[error("amount must be a decimal number such as 99.99, got {0}")]
    NotANumber(String),
    /// Zero or less.
    #[error("amount must be greater than zero, got {0}")]
    NotPositive(String),
    /// More fraction digits than the currency has.
    #[error("{currency} amounts have at most {max} digits after the decimal point, got {amount}")]
    TooPrecise {
        /// The amount as sent.
        amount: String,
        /// The currency.
        currency: &'static str,
        /// Its minor units.
        max: u32,
    },
    /// Over the configured maximum.
    #[error("amount must be at most {max} {currency}, got {amount}")]
    TooLarge {
        /// The amount as sent.
        amount: String,
        /// The currency.
        currency: &'static str,
        /// The maximum.
        max: Decimal,
    },
}

/// Parses an amount from its text (a JSON number's digits or a JSON string) for `currency`.
///
/// Accepts `123`, `123.4`, `0.50`, and for JSON numbers an exponent (`1.5e2`); refuses signs,
/// blanks, `NaN`, hex and anything else. Fraction digits are counted as written.
pub fn parse_amount(text: &str, currency: Currency, max: Decimal) -> Result<Decimal, AmountError> {
    let t = text.trim();
    let plain = t
        .bytes()
        .enumerate()
        .all(|(i, b)| b.is_ascii_digit() || (b == b'.' && i > 0))
        && t.bytes().filter(|b| *b == b'.').count() <= 1
        && !t.ends_with('.')
        && !t.is_empty();
    let negative = t.starts_with('-');
    let scientific = !plain && !negative && t.bytes().any(|b| b == b'e' || b == b'E');
    // Refuse absurd lengths before parsing: no real amount needs 40 characters.
    if t.len() > 40 {
        return Err(AmountError::NotANumber(abbreviate(t)));
    }
    let value = if plain {
        Decimal::from_str(t).map_err(|_| AmountError::NotANumber(abbreviate(t)))?
    } else if scientific {
        Decimal::from_scientific(t).map_err(|_| AmountError::NotANumber(abbreviate(t)))?
    } else if negative && Decimal::from_str(t).is_ok() {
        return Err(AmountError::NotPositive(t.to_owned()));
    } else {
        return Err(AmountError::NotANumber(abbreviate(t)));
    };
    if value <= Decimal::ZERO || value.is_sign_negative() {
        return Err(AmountError::NotPositive(t.to_owned()));
    }
    if value.scale() > currency.minor_units() {
        return Err(AmountError::TooPrecise {
            amount: t.to_owned(),
            currency: currency.code(),
            max: currency.minor_units(),
        });
    }
    if value > max {
        return Err(AmountError::TooLarge {
            amount: abbreviate(t),
            currency: currency.code(),
            max,
        });
    }
    Ok(value)
}

fn abbreviate(t: &str) -> String {
    if t.len() > 40 {
        format!(
            "{}…",
            &t[..t.char_indices().nth(40).map(|(i, _)| i).unwrap_or(t.len())]
        )
    } else {
        t.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::parse("usd").expect("USD")
    }
    fn max() -> Decimal {
        Decimal::from(1_000_000)
    }

    #[test]
    fn exact_amounts_within_minor_units() {
        assert_eq!(
            parse_amount("99.99", usd(), max()).expect("ok").to_string(),
            "99.99"
        );
        assert_eq!(
            parse_amount("10000.00", usd(), max())
                .expect("ok")
                .to_string(),
            "10000.00"
        );
        assert_eq!(
            parse_amount("1.5e2", usd(), max()).expect("ok"),
            Decimal::from(150)
        );
        assert_eq!(parse_amount("1000000", usd(), max()).expect("ok"), max());
        let jpy = Currency::parse("JPY").expect("JPY");
        assert_eq!(
            parse_amount("500", jpy, max()).expect("ok"),
            Decimal::from(500)
        );
        assert!(matches!(
            parse_amount("500.5", jpy, max()),
            Err(AmountError::TooPrecise { max: 0, .. })
        ));
        let kwd = Currency::parse("kwd").expect("KWD");
        assert!(parse_amount("1.234", kwd, max()).is_ok());
    }

    #[test]
    fn refusals() {
        for (text, want) in [
            ("0", "NotPositive"),
            ("0.00", "NotPositive"),
            ("-0", "NotPositive"),
            ("-0.0", "NotPositive"),
            ("-5", "NotPositive"),
            ("1.234", "TooPrecise"),
            ("1000000.01", "TooLarge"),
            ("1e7", "TooLarge"),
            ("abc", "NotANumber"),
            ("", "NotANumber"),
            ("1.", "NotANumber"),
            (".5", "NotANumber"),
            ("+5", "NotANumber"),
            ("0x10", "NotANumber"),
            ("NaN", "NotANumber"),
            ("1e400", "NotANumber"),
            ("1e-400", "NotANumber"),
            ("1,5", "NotANumber"),
            ("12345678901234567890123456789012345678901", "NotANumber"),
        ] {
            let got = parse_amount(text, usd(), max()).expect_err(text);
            assert!(format!("{got:?}").starts_with(want), "{text}: {got:?}");
        }
    }

    #[test]
    fn currency_lookup() {
        assert_eq!(Currency::parse("eur").map(Currency::code), Some("EUR"));
        assert!(Currency::parse("XXX").is_none());
        assert!(Currency::parse("US").is_none());
    }
}
