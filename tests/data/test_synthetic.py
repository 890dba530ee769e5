"""Synthetic TOFU authors: schema, determinism per seed, author blocks."""

from __future__ import annotations

from alter_jax.data.synthetic import TEMPLATES, generate_authors, train_toy_tokenizer, write_tofu_folder
from alter_jax.data.tofu import author_blocks, load_tofu_split, validate_rows


def test_deterministic_per_seed():
    a = generate_authors(4, seed=7)
    b = generate_authors(4, seed=7)
    c = generate_authors(4, seed=8)
    assert a == b
    assert a != c


def test_schema_and_blocks():
    rows = generate_authors(6, seed=0, per_author=20)
    assert len(rows) == 120
    validate_rows(rows, "forget10_perturbed", "synthetic")  # TOFU perturbed schema, 5 perturbed answers
    blocks = author_blocks(rows, per_author=20)
    names = []
    for block in blocks:
        # all rows of a block are about one author: its name appears in each row
        name = block[0]["answer"].split(" was born in ")[0]
        names.append(name)
        assert sum(name in r["question"] + r["answer"] for r in block) == len(block)
        for r in block:
            assert r["paraphrased_answer"] not in r["perturbed_answer"]
            assert len(set(r["perturbed_answer"])) == 5
            assert "domain" not in r
    assert len(set(names)) == 6
    assert len(TEMPLATES) >= 20


def test_options():
    rows = generate_authors(3, seed=1, per_author=7, with_domain=True)
    assert len(rows) == 21 and all("domain" in r for r in rows)
    many = generate_authors(2, seed=1, per_author=25)
    assert len(many) == 50


def test_write_folder_deterministic(tmp_path):
    write_tofu_folder(tmp_path / "a", num_authors=10, forget_authors=1, seed=5)
    write_tofu_folder(tmp_path / "b", num_authors=10, forget_authors=1, seed=5)
    for name in ("full", "forget10", "forget10_perturbed", "retain90", "retain_perturbed", "world_facts_perturbed"):
        assert (tmp_path / "a" / f"{name}.json").read_bytes() == (tmp_path / "b" / f"{name}.json").read_bytes()
    assert len(load_tofu_split("forget10_perturbed", tmp_path / "a")) == 20
    assert len(load_tofu_split("retain90", tmp_path / "a")) == 180


def test_toy_tokenizer_roundtrip():
    rows = generate_authors(2, seed=0)
    tok = train_toy_tokenizer([r["answer"] for r in rows], kind="llama2", vocab_size=300)
    ids = tok(rows[0]["answer"]).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == rows[0]["answer"]
