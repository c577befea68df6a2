//! Statements over a long list of values, run in chunks: `fetch_in` and `execute_in` on
//! [`Db`](crate::Db) and [`Tx`](super::Tx), the list where the statement says [`IDS`].

use super::{Row, Tx, Value};
use crate::Db;

/// Where a chunked statement's list of values goes: `... WHERE server_id IN $ids` (see
/// [`Tx::fetch_in`]).
pub const IDS: &str = "$ids";

/// The most values one chunked statement binds in its list (every backend takes it, and
/// PostgreSQL plans it as well as a short list).
pub const IN_CHUNK: usize = 500;

/// `(?, ?, ?)` with `n` placeholders.
pub fn in_list(n: usize) -> String {
    let mut s = String::with_capacity(n * 3 + 2);
    s.push('(');
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        s.push('?');
    }
    s.push(')');
    s
}

/// The statements and arguments of a chunked statement: `sql` with [`IDS`] replaced by one
/// chunk's placeholders, `before` bound ahead of the chunk's values.
fn chunked<'a, T: Clone + Into<Value>>(
    sql: &'a str,
    before: &'a [Value],
    values: &'a [T],
) -> impl Iterator<Item = (String, Vec<Value>)> + 'a {
    debug_assert!(
        sql.contains(IDS),
        "a chunked statement without {IDS}: {sql}"
    );
    values.chunks(IN_CHUNK).map(move |chunk| {
        let args = before
            .iter()
            .cloned()
            .chain(chunk.iter().cloned().map(Into::into))
            .collect();
        (sql.replace(IDS, &in_list(chunk.len())), args)
    })
}

/// `fetch_in` and `execute_in` for a type with `fetch` and `execute`: one statement per chunk
/// of at most [`IN_CHUNK`] values.
macro_rules! chunked_statements {
    ($ty:ty, $($mut:tt)?) => {
        impl $ty {
            /// Runs the query once per chunk of `values` (at most [`IN_CHUNK`]), its [`IDS`]
            /// replaced by the chunk's placeholders and `before` bound ahead of them; returns
            /// the rows of every chunk, in order.
            pub async fn fetch_in<T: Clone + Into<Value>>(
                &$($mut)? self,
                sql: &str,
                before: &[Value],
                values: &[T],
            ) -> Result<Vec<Row>, sqlx::Error> {
                let mut rows = Vec::new();
                for (sql, args) in chunked(sql, before, values) {
                    rows.extend(self.fetch(&sql, &args).await?);
                }
                Ok(rows)
            }

            /// Runs the statement once per chunk of `values`, as [`fetch_in`](Self::fetch_in)
            /// does; returns the rows affected in all.
            pub async fn execute_in<T: Clone + Into<Value>>(
                &$($mut)? self,
                sql: &str,
                before: &[Value],
                values: &[T],
            ) -> Result<u64, sqlx::Error> {
                let mut affected = 0;
                for (sql, args) in chunked(sql, before, values) {
                    affected += self.execute(&sql, &args).await?;
                }
                Ok(affected)
            }
        }
    };
}

chunked_statements!(Db,);
chunked_statements!(Tx, mut);
