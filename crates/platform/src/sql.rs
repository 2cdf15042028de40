//! Hand-written SQL that Postgres prepares once per connection.
//!
//! `diesel::sql_query` marks every statement as unsafe to cache, so each execution is parsed,
//! planned and described again — an extra round trip per statement on the hot path. A
//! [`Statement`] keeps its text constant and its values as bind parameters, so diesel's
//! statement cache can key it by text and reuse the prepared statement.

use std::borrow::Cow;

use diesel::QueryResult;
use diesel::expression::AsExpression;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::Untyped;

type Bind = Box<dyn QueryFragment<Pg> + Send + Sync>;

/// SQL text with `$1`, `$2`, … placeholders and their values, in order of number.
pub struct Statement {
    text: Cow<'static, str>,
    binds: Vec<Bind>,
}

impl std::fmt::Debug for Statement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Statement")
            .field("text", &self.text)
            .field("binds", &self.binds.len())
            .finish()
    }
}

/// A statement from SQL text; placeholders `$n` refer to the n-th [`Statement::bind`].
pub fn sql(text: impl Into<Cow<'static, str>>) -> Statement {
    Statement {
        text: text.into(),
        binds: Vec::new(),
    }
}

impl Statement {
    /// Binds the next placeholder to `value` as SQL type `ST`.
    pub fn bind<ST, V>(mut self, value: V) -> Self
    where
        V: AsExpression<ST>,
        V::Expression: QueryFragment<Pg> + Send + Sync + 'static,
        ST: diesel::sql_types::SqlType + diesel::expression::TypedExpressionType,
    {
        self.binds.push(Box::new(value.as_expression()));
        self
    }
}

impl QueryFragment<Pg> for Statement {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        // Re-emit the text, replacing each `$n` by diesel's own placeholder for bind n (so a
        // placeholder used twice binds its value twice).
        let text = self.text.as_ref();
        let bytes = text.as_bytes();
        let (mut start, mut i) = (0, 0);
        while i < bytes.len() {
            if bytes[i] == b'$' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
                let digits = bytes[i + 1..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                let number: usize = text[i + 1..i + 1 + digits].parse().unwrap_or(0);
                let bind = number
                    .checked_sub(1)
                    .and_then(|n| self.binds.get(n))
                    .ok_or_else(|| {
                        diesel::result::Error::QueryBuilderError(
                            format!("${number} has no bound value").into(),
                        )
                    })?;
                out.push_sql(&text[start..i]);
                bind.walk_ast(out.reborrow())?;
                i += 1 + digits;
                start = i;
            } else {
                i += 1;
            }
        }
        out.push_sql(&text[start..]);
        Ok(())
    }
}

impl QueryId for Statement {
    type QueryId = ();
    // No static id: the cache keys it by its SQL text and bind types instead.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Statement {
    type SqlType = Untyped;
}

#[cfg(test)]
mod tests {
    use diesel::sql_types::{BigInt, Text};

    use super::*;

    #[test]
    fn placeholders_are_renumbered_in_order_of_use() {
        let statement = sql("SELECT $2, $1 WHERE x = $2")
            .bind::<BigInt, _>(7i64)
            .bind::<Text, _>("a");
        let text = diesel::debug_query::<Pg, _>(&statement).to_string();
        assert!(text.starts_with("SELECT $1, $2 WHERE x = $3"), "{text}");
        assert!(text.contains(r#"binds: ["a", 7, "a"]"#), "{text}");
    }

    #[test]
    fn a_missing_value_is_an_error() {
        let statement = sql("SELECT $1, $2").bind::<BigInt, _>(1i64);
        let mut builder = diesel::pg::PgQueryBuilder::default();
        assert!(statement.to_sql(&mut builder, &Pg).is_err());
    }
}
