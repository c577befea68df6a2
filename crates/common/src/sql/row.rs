//! Rows of plain values and their decoding: by position (`Row::int`, `text`...), by a row
//! declared once (`stored_row!`, each field by its `Column`), or as a small tuple at its
//! statement (`Row::decode`).

use super::Value;

/// A row of plain values, by column position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(pub Vec<Value>);

/// A column's value as a Rust type, read from a [`Row`] by position: what [`stored_row!`]
/// decodes each field with.
pub trait Column: Sized {
    /// The value of column `index` of `row`.
    fn column(row: &Row, index: usize) -> Result<Self, sqlx::Error>;
}

impl Column for i64 {
    fn column(row: &Row, index: usize) -> Result<Self, sqlx::Error> {
        row.int(index)
    }
}

impl Column for Option<i64> {
    fn column(row: &Row, index: usize) -> Result<Self, sqlx::Error> {
        row.opt_int(index)
    }
}

impl Column for String {
    fn column(row: &Row, index: usize) -> Result<Self, sqlx::Error> {
        row.text(index)
    }
}

impl Column for Option<String> {
    fn column(row: &Row, index: usize) -> Result<Self, sqlx::Error> {
        row.opt_text(index)
    }
}

impl<T: crate::model::Stored> Column for T {
    fn column(row: &Row, index: usize) -> Result<Self, sqlx::Error> {
        Ok(T::from_stored(&row.text(index)?)?)
    }
}

impl<T: crate::model::Stored> Column for Option<T> {
    fn column(row: &Row, index: usize) -> Result<Self, sqlx::Error> {
        match row.opt_text(index)? {
            Some(text) => Ok(Some(T::from_stored(&text)?)),
            None => Ok(None),
        }
    }
}

/// A small row declared where its statement is: one value, or a tuple of up to four, read
/// from the row's columns in order ([`Row::decode`]).
pub trait FromColumns: Sized {
    /// The values of `row`, from its first column on.
    fn from_columns(row: &Row) -> Result<Self, sqlx::Error>;
}

impl<T: Column> FromColumns for T {
    fn from_columns(row: &Row) -> Result<Self, sqlx::Error> {
        T::column(row, 0)
    }
}

macro_rules! tuple_from_columns {
    ($($t:ident $i:tt),+) => {
        impl<$($t: Column),+> FromColumns for ($($t,)+) {
            fn from_columns(row: &Row) -> Result<Self, sqlx::Error> {
                Ok(($($t::column(row, $i)?,)+))
            }
        }
    };
}

tuple_from_columns!(A 0, B 1);
tuple_from_columns!(A 0, B 1, C 2);
tuple_from_columns!(A 0, B 1, C 2, D 3);

/// A row as one statement reads it, declared once: a struct whose fields are the columns, in
/// order, with `COLUMNS` (the select list: each field's name, or the SQL given after `=`) and
/// `COLUMN_COUNT` (to read what a statement selects after them), and its decoding from a
/// [`Row`] (each field by its type's [`Column`]; stored vocabularies are `Column` through
/// `stored_enum!`). Domain types are made from these rows, so that no column is read by a
/// number written by hand.
///
/// ```
/// fleetsync_common::stored_row! {
///     /// A lease as the fence reads it.
///     pub struct LeaseRow {
///         pub server_id: i64,
///         pub holder: Option<String> = "l.holder",
///     }
/// }
/// assert_eq!(LeaseRow::COLUMNS, "server_id, l.holder");
/// assert_eq!(LeaseRow::COLUMN_COUNT, 2);
/// ```
#[macro_export]
macro_rules! stored_row {
    (@column $field:ident) => { stringify!($field) };
    (@column $field:ident = $sql:literal) => { $sql };
    (@columns $field:ident $(= $sql:literal)? $(, $rest:ident $(= $rsql:literal)?)*) => {
        concat!(
            $crate::stored_row!(@column $field $(= $sql)?)
            $(, ", ", $crate::stored_row!(@column $rest $(= $rsql)?))*
        )
    };
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $($(#[$fmeta:meta])* $fvis:vis $field:ident : $ty:ty $(= $sql:literal)?),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        $vis struct $name {
            $($(#[$fmeta])* $fvis $field: $ty,)+
        }

        impl $name {
            /// The select list, in the order the fields are decoded.
            #[allow(dead_code)]
            $vis const COLUMNS: &'static str = $crate::stored_row!(@columns $($field $(= $sql)?),+);
            /// How many columns [`Self::COLUMNS`] has: the index of the first one a statement
            /// selects after them.
            #[allow(dead_code)]
            $vis const COLUMN_COUNT: usize = [$(stringify!($field)),+].len();
        }

        impl $name {
            /// Decodes the fields from the columns of `row` that start at `first` (a row that
            /// selects other declared columns before these).
            #[allow(dead_code, unused_assignments)]
            $vis fn read(row: &$crate::sql::Row, first: usize) -> Result<Self, sqlx::Error> {
                let mut index = first;
                Ok(Self {
                    $($field: {
                        let value = <$ty as $crate::sql::Column>::column(row, index)?;
                        index += 1;
                        value
                    },)+
                })
            }
        }

        impl TryFrom<&$crate::sql::Row> for $name {
            type Error = sqlx::Error;

            fn try_from(row: &$crate::sql::Row) -> Result<Self, sqlx::Error> {
                Self::read(row, 0)
            }
        }
    };
}

fn decode_error(index: usize, expected: &str, got: &Value) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: index.to_string(),
        source: format!("expected {expected}, got {got:?}").into(),
    }
}

impl Row {
    /// The row as the types its statement selects, in order: `let (state, n): (JobState, i64)
    /// = row.decode()?` for `SELECT state, COUNT(*)`.
    pub fn decode<T: FromColumns>(&self) -> Result<T, sqlx::Error> {
        T::from_columns(self)
    }

    fn value(&self, index: usize) -> Result<&Value, sqlx::Error> {
        self.0
            .get(index)
            .ok_or_else(|| sqlx::Error::ColumnIndexOutOfBounds {
                index,
                len: self.0.len(),
            })
    }

    /// An integer column that is not NULL.
    pub fn int(&self, index: usize) -> Result<i64, sqlx::Error> {
        match self.value(index)? {
            Value::Int(v) => Ok(*v),
            other => Err(decode_error(index, "an integer", other)),
        }
    }

    /// An integer column that may be NULL.
    pub fn opt_int(&self, index: usize) -> Result<Option<i64>, sqlx::Error> {
        match self.value(index)? {
            Value::Null | Value::NullText => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            other => Err(decode_error(index, "an integer or NULL", other)),
        }
    }

    /// A text column that is not NULL.
    pub fn text(&self, index: usize) -> Result<String, sqlx::Error> {
        match self.value(index)? {
            Value::Text(v) => Ok(v.clone()),
            other => Err(decode_error(index, "text", other)),
        }
    }

    /// A text column that may be NULL.
    pub fn opt_text(&self, index: usize) -> Result<Option<String>, sqlx::Error> {
        match self.value(index)? {
            Value::Null | Value::NullText => Ok(None),
            Value::Text(v) => Ok(Some(v.clone())),
            other => Err(decode_error(index, "text or NULL", other)),
        }
    }
}
