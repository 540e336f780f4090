//! Raw SQL that diesel keeps prepared.
//!
//! `diesel::sql_query` marks its statement unsafe to cache, so it is parsed
//! and planned on every run. [`prepared`] offers the same builder (`.bind`,
//! then `.load`, `.get_result`, `.execute`) over a `&'static str`, which
//! diesel's per-connection statement cache keys by its text: the hot-path
//! statements are prepared once per pooled connection, on both backends.
//!
//! Placeholders are written `?`, one per `.bind`, in order (diesel turns them
//! into `$1, $2, …` on PostgreSQL); a value used twice is bound twice. The
//! text must hold no other `?` (no PostgreSQL `?` JSON operators).

use std::marker::PhantomData;
use std::str::Split;

use diesel::RunQueryDsl;
use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::result::QueryResult;
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};

/// A fixed SQL text with `?` placeholders; bind each with `.bind::<ST, _>(v)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prepared(&'static str);

pub(crate) fn prepared(sql: &'static str) -> Prepared {
    Prepared(sql)
}

/// A [`Prepared`] statement with its binds so far.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bound<P, V, ST> {
    prev: P,
    value: V,
    _type: PhantomData<ST>,
}

impl Prepared {
    pub(crate) fn bind<ST, V>(self, value: V) -> Bound<Self, V, ST> {
        Bound {
            prev: self,
            value,
            _type: PhantomData,
        }
    }
}

impl<P, V, ST> Bound<P, V, ST> {
    pub(crate) fn bind<ST2, V2>(self, value: V2) -> Bound<Self, V2, ST2> {
        Bound {
            prev: self,
            value,
            _type: PhantomData,
        }
    }
}

/// Writes the SQL up to and including a link's placeholder; hands the rest of
/// the text on.
pub(crate) trait Link<DB: Backend> {
    fn emit<'b>(&'b self, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<Split<'static, char>>;
}

impl<DB: Backend> Link<DB> for Prepared {
    fn emit<'b>(&'b self, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<Split<'static, char>> {
        let mut parts = self.0.split('?');
        out.push_sql(parts.next().unwrap_or_default());
        Ok(parts)
    }
}

impl<DB, P, V, ST> Link<DB> for Bound<P, V, ST>
where
    DB: Backend + HasSqlType<ST>,
    P: Link<DB>,
    V: ToSql<ST, DB>,
{
    fn emit<'b>(&'b self, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<Split<'static, char>> {
        let mut parts = self.prev.emit(out)?;
        out.push_bind_param::<ST, V>(&self.value)?;
        let rest = parts.next().ok_or_else(|| {
            diesel::result::Error::QueryBuilderError("more binds than `?` in a statement".into())
        })?;
        out.push_sql(rest);
        Ok(parts)
    }
}

fn finish(mut parts: Split<'static, char>) -> QueryResult<()> {
    match parts.next() {
        None => Ok(()),
        Some(_) => Err(diesel::result::Error::QueryBuilderError(
            "fewer binds than `?` in a statement".into(),
        )),
    }
}

impl<DB: Backend> QueryFragment<DB> for Prepared {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        finish(self.emit(&mut out)?)
    }
}

impl<DB, P, V, ST> QueryFragment<DB> for Bound<P, V, ST>
where
    DB: Backend + HasSqlType<ST>,
    P: Link<DB>,
    V: ToSql<ST, DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        finish(self.emit(&mut out)?)
    }
}

// No static query id: the statement cache keys these by their SQL text.
impl QueryId for Prepared {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<P, V, ST> QueryId for Bound<P, V, ST> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Prepared {
    type SqlType = Untyped;
}

impl<P, V, ST> Query for Bound<P, V, ST> {
    type SqlType = Untyped;
}

impl<Conn> RunQueryDsl<Conn> for Prepared {}
impl<P, V, ST, Conn> RunQueryDsl<Conn> for Bound<P, V, ST> {}

#[cfg(test)]
mod tests {
    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Text};

    use super::prepared;

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Row {
        #[diesel(sql_type = BigInt)]
        n: i64,
        #[diesel(sql_type = Text)]
        s: String,
    }

    #[test]
    fn binds_fill_the_placeholders_in_order_and_must_match_them() {
        let mut c = SqliteConnection::establish(":memory:").unwrap();
        let row: Row = prepared("SELECT ? - ? AS n, ? AS s")
            .bind::<BigInt, _>(10_i64)
            .bind::<BigInt, _>(3_i64)
            .bind::<Text, _>("x")
            .get_result(&mut c)
            .unwrap();
        assert_eq!(
            row,
            Row {
                n: 7,
                s: "x".into()
            }
        );
        // Run again: served from the statement cache, with new values.
        let row: Row = prepared("SELECT ? - ? AS n, ? AS s")
            .bind::<BigInt, _>(1_i64)
            .bind::<BigInt, _>(1_i64)
            .bind::<Text, _>("y")
            .get_result(&mut c)
            .unwrap();
        assert_eq!(
            row,
            Row {
                n: 0,
                s: "y".into()
            }
        );
        let too_few = prepared("SELECT ? AS n, ? AS s")
            .bind::<BigInt, _>(1_i64)
            .get_result::<Row>(&mut c);
        assert!(too_few.is_err());
        let too_many = prepared("SELECT 1 AS n, ? AS s")
            .bind::<Text, _>("a")
            .bind::<Text, _>("b")
            .get_result::<Row>(&mut c);
        assert!(too_many.is_err());
    }
}
