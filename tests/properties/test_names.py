"""Names that reach SQL: every validator refuses hostile input with its own error, and what it
accepts renders as one quoted identifier or literal that reads back as the same name."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from psycopg import sql

from catalog.store import check_address, check_migration_id, check_shard_id
from shards.errors import InvalidNameError
from shards.models import IndexDefinition
from shards.names import MAX_PATH_DEPTH, check_collection, check_field_path, check_index_name
from shards.postgres.schema import collection_table, field_expr, index_table_name
from tests.properties.conftest import (
    PURE,
    collection_names,
    field_paths,
    hostile_text,
    hostile_values,
    index_names,
)

_IDENT = re.compile(r"[A-Za-z0-9_]+")
"""All an accepted name may contain: nothing that means anything to SQL."""


@PURE
@given(hostile_values)
@example("a'b")
@example("a" * 49)
@example("\x00")
@example("é")
def test_collection_names_refused_or_plain(name: object) -> None:
    try:
        out = check_collection(name)
    except InvalidNameError as exc:
        assert "invalid collection name" in str(exc)
        return
    assert out == name and isinstance(out, str)
    assert _IDENT.fullmatch(out) and len(out) <= 48 and out[0].isalpha()


@PURE
@given(hostile_values)
@example("a..b")
@example(".a")
@example("a.")
@example("$where")
@example(".".join(["a"] * (MAX_PATH_DEPTH + 1)))
def test_field_paths_refused_or_plain(path: object) -> None:
    try:
        parts = check_field_path(path)
    except InvalidNameError as exc:
        assert "invalid field path" in str(exc)
        return
    assert ".".join(parts) == path
    assert 1 <= len(parts) <= MAX_PATH_DEPTH
    assert all(_IDENT.fullmatch(p) and not p[0].isdigit() for p in parts)


@PURE
@given(hostile_values)
def test_index_names_refused_or_plain(name: object) -> None:
    try:
        out = check_index_name(name)
    except InvalidNameError:
        return
    assert _IDENT.fullmatch(out) and len(out) <= 41


@PURE
@given(hostile_values)
def test_shard_and_migration_ids_refused_or_plain(value: object) -> None:
    for check, allowed in ((check_shard_id, r"[A-Za-z0-9_.-]+"),
                           (check_migration_id, r"[A-Za-z0-9_.:/-]+")):
        try:
            out = check(value)
        except InvalidNameError:
            continue
        assert re.fullmatch(allowed, out)


@PURE
@given(hostile_values)
def test_shard_addresses_refused_with_value_errors(address: object) -> None:
    """Whatever is passed as an address, the answer is the address or a ValueError (never a
    driver exception)."""
    try:
        check_address(address)
    except ValueError:
        return


@PURE
@given(collection_names)
def test_collection_table_is_one_quoted_identifier(name: str) -> None:
    text = collection_table(check_collection(name)).as_string(None)
    assert text == f'"docs"."{name}"'


@PURE
@given(field_paths)
def test_field_expression_quotes_every_segment(path: str) -> None:
    parts = check_field_path(path)
    text = field_expr(parts).as_string(None)
    assert text == '"doc"' + "".join(f" -> '{p}'" for p in parts)


@PURE
@given(collection_names, index_names, index_names)
@example("c" * 48, "by_email_address_primary_1", "by_email_address_primary_2")
def test_index_table_names_fit_and_never_collide(collection: str, a: str, b: str) -> None:
    """Distinct indexes of a collection get distinct PostgreSQL names of at most 63 bytes.

    Found: the name was ``ix_<collection>__<index>`` cut at 63 characters, so two indexes of a
    long-named collection that shared a prefix got the same name and the second
    ``CREATE INDEX IF NOT EXISTS`` silently created nothing (the example above)."""
    na, nb = index_table_name(collection, a), index_table_name(collection, b)
    assert len(na.encode()) <= 63 and len(nb.encode()) <= 63
    assert (na == nb) == (a == b)
    assert sql.Identifier(na).as_string(None) == f'"{na}"'


@PURE
@given(st.one_of(hostile_text, index_names), st.lists(st.one_of(hostile_text, field_paths),
                                                      min_size=0, max_size=6))
def test_index_definitions_validate_or_refuse(name: str, fields: list[str]) -> None:
    from pydantic import ValidationError

    try:
        ix = IndexDefinition(name=name, fields=tuple(fields))
    except ValidationError:
        return
    check_index_name(ix.name)
    assert 1 <= len(ix.fields) <= 4
    for f in ix.fields:
        check_field_path(f)


def test_index_definitions_refuse_a_non_string_name() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        IndexDefinition(name=7, fields=("a",))  # type: ignore[arg-type]
