"""The catalogue's API keys: stored only as hashes, one active key per name, revocable."""

from __future__ import annotations

import pytest

from atlas.catalog import ROLES, ApiKeyError, Catalog, hash_token


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    return Catalog(tmp_path)


@pytest.fixture
def tokens(catalog) -> dict[str, str]:
    return {role: catalog.create_key(f"{role}-key", role) for role in ROLES}


def test_keys_are_stored_only_as_hashes(catalog, tokens):
    with catalog.connect(read_only=True) as db:
        rows = db.execute("SELECT name, role, token_sha256 FROM api_keys ORDER BY name").fetchall()
    stored = {name: (role, digest) for name, role, digest in rows}
    assert stored["technologist-key"] == ("technologist", hash_token(tokens["technologist"]))
    assert all(token not in str(rows) for token in tokens.values())


def test_key_creation_rejects_bad_role_and_taken_name(catalog, tokens):
    with pytest.raises(ApiKeyError, match="reviewer, technologist, admin"):
        catalog.create_key("someone", "superuser")
    with pytest.raises(ApiKeyError, match="exists"):
        catalog.create_key("admin-key", "admin")
    with pytest.raises(ApiKeyError, match="needs a name"):
        catalog.create_key("  ", "admin")


def test_active_key_finds_the_token_until_it_is_revoked(catalog, tokens):
    key = catalog.active_key(tokens["reviewer"])
    assert (key["name"], key["role"], len(key["key_id"])) == ("reviewer-key", "reviewer", 12)
    assert catalog.active_key("cak_not-a-key") is None
    assert catalog.revoke_key("reviewer-key") == 1
    assert catalog.active_key(tokens["reviewer"]) is None
    with pytest.raises(ApiKeyError, match="no active key"):
        catalog.revoke_key("reviewer-key")
    new_token = catalog.create_key("reviewer-key", "reviewer")  # the name is free again
    assert catalog.active_key(new_token)["role"] == "reviewer"
