//! Field checks both services' requests share: free text, page sizes and enum values (ids are
//! checked by their types, `fleetsync_common::ids`). Each error names its field, as
//! `INVALID_ARGUMENT`.

use fleetsync_common::ServiceError;

/// Text of at most `max` characters, without control characters.
pub use fleetsync_common::ids::short_text as text;

/// Free text kept as the caller wrote it (newlines, tabs and other control characters
/// included; escaped where it is displayed), of at most `max` characters. Only NUL is refused:
/// PostgreSQL cannot store it in text.
pub fn free_text(value: &str, field: &'static str, max: usize) -> Result<(), ServiceError> {
    if value.chars().count() > max {
        return Err(ServiceError::invalid(
            field,
            format!("longer than {max} characters"),
        ));
    }
    if value.contains('\0') {
        return Err(ServiceError::invalid(
            field,
            "contains a NUL character, which cannot be stored",
        ));
    }
    Ok(())
}

/// A page size: 0 is `default`, more than `max` an error.
pub fn page_size(value: u32, default: i64, max: i64) -> Result<i64, ServiceError> {
    match i64::from(value) {
        0 => Ok(default),
        n if n > max => Err(ServiceError::invalid(
            "page_size",
            format!("at most {max}, got {n}"),
        )),
        n => Ok(n),
    }
}

/// An optional enum field: 0 (`UNSPECIFIED`) is `None`; a value the proto does not know, or one
/// `known` has no meaning for, is an error.
pub fn optional_enum<P: TryFrom<i32>, T>(
    field: &'static str,
    value: i32,
    known: impl FnOnce(P) -> Option<T>,
) -> Result<Option<T>, ServiceError> {
    if value == 0 {
        return Ok(None);
    }
    P::try_from(value)
        .ok()
        .and_then(known)
        .map(Some)
        .ok_or_else(|| ServiceError::invalid(field, format!("unknown value {value}")))
}
