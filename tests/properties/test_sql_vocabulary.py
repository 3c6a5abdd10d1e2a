"""What reaches SQL: generated collections, field paths, filters and patches compile to
statements whose text is a fixed template; names appear only as quoted identifiers or quoted
literals, and values (filter values, patch contents, ids, documents) only as parameters."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from shards.errors import InvalidDocumentError, InvalidNameError
from shards.postgres.documents import DocumentStatements, validate_patch
from tests.properties.conftest import FEW, collection_names, field_paths, hostile_text

_QUOTED = re.compile(rb'"(?:[^"]|"")*"|\'(?:[^\']|\'\')*\'')
_PARAM = re.compile(rb"%\((\w+)\)s")
_PARAMS = {b"c", b"k", b"t", b"h", b"id", b"doc", b"patch", b"v", b"n", b"ks", b"ts"}


def _statements(collection: str, key: str, path: str) -> list[bytes]:
    st_ = DocumentStatements(collection)
    return [st_.insert, st_.replace, st_.patch, st_.delete, st_.get,
            st_.find_key_sql(key), st_.find_field_sql(path)]


_PATCH_SQL = DocumentStatements("c").patch
_CHAIN = re.compile(rb"Q(?: -> Q)+")


def _template(query: bytes) -> bytes:
    """The statement with every quoted part blanked (a field path's ``-> 'segment'`` chain
    counts once, whatever its depth)."""
    return _CHAIN.sub(b"Q -> Q", _QUOTED.sub(b"Q", query))


_REFERENCE = [_template(q) for q in _statements("c", "k", "p")]
"""The fixed vocabulary: every statement with its quoted parts blanked."""


def _quoted(query: bytes) -> list[bytes]:
    return [m.group(0) for m in _QUOTED.finditer(query)]


@FEW
@given(collection_names, field_paths, field_paths)
def test_statements_are_a_fixed_template(collection: str, key: str, path: str) -> None:
    queries = _statements(collection, key, path)
    segments = {f"'{x}'".encode() for x in (*key.split("."), *path.split("."))}
    for query, reference in zip(queries, _REFERENCE, strict=True):
        # Outside quotes the text is exactly the reference: names add nothing but quotes.
        assert _template(query) == reference
        assert set(_PARAM.findall(query)) <= _PARAMS
        quoted = set(_quoted(query))
        assert quoted <= {f'"{collection}"'.encode(), b'"docs"', b'"doc"', b'"d"',
                          b"'active'", *segments}


@FEW
@given(st.one_of(hostile_text, collection_names), st.one_of(hostile_text, field_paths))
def test_hostile_names_never_compile(collection: str, path: str) -> None:
    """A name the validators refuse produces no SQL at all."""
    try:
        queries = _statements(collection, path, path)
    except InvalidNameError:
        return
    assert all(_template(q) == r for q, r in zip(queries, _REFERENCE, strict=True))


@FEW
@given(st.dictionaries(st.sampled_from(["$set", "$unset", "$inc"]),
                       st.dictionaries(field_paths, st.one_of(hostile_text, st.integers(
                           min_value=-(2**63), max_value=2**63 - 1), st.floats()),
                           min_size=1, max_size=3), min_size=1, max_size=3))
def test_patches_are_a_json_parameter(update: dict[str, Any]) -> None:
    """A patch is one JSON parameter; the statement that applies it does not change."""
    try:
        patch = validate_patch(update, ("_id", "acct"))
    except (InvalidDocumentError, InvalidNameError):
        return
    import json

    decoded = json.loads(patch)
    assert set(decoded) <= {"set", "unset", "inc"}
    assert _PATCH_SQL.count(b"%(patch)s") == 1
