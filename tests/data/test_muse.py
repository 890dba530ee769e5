"""MUSE loaders: local folder layout (json / jsonl / parquet shards), validation, verbmem probes."""

from __future__ import annotations

import json

import pytest

from alter_jax.data.muse import (
    MuseDataError,
    QAItem,
    VerbMemItem,
    load_knowmem,
    load_muse_split,
    load_texts,
    load_verbmem,
    make_verbmem_items,
)


@pytest.fixture()
def muse_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "MUSE-News"
    for c in ("verbmem", "knowmem", "privleak"):
        (root / c).mkdir(parents=True)
    (root / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": "Once upon", "gt": " a time"}]))
    (root / "knowmem" / "forget_qa.jsonl").write_text(
        json.dumps({"question": "Who?", "answer": "Bob"}) + "\n" + json.dumps({"question": "Where?", "answer": "Paris"}) + "\n")
    (root / "knowmem" / "forget_qa_icl.json").write_text(json.dumps([{"question": "Q0", "answer": "A0"}]))
    # hub snapshot style: parquet shards
    pq.write_table(pa.Table.from_pylist([{"text": "first forget text"}]), root / "privleak" / "forget-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "second forget text"}]), root / "privleak" / "forget-00001-of-00002.parquet")
    (root / "privleak" / "holdout.json").write_text(json.dumps(["a holdout text", "another"]))  # bare strings
    return root


def test_local_layout(muse_dir):
    assert load_verbmem(muse_dir) == [VerbMemItem("Once upon", " a time")]
    assert load_knowmem(muse_dir) == [QAItem("Who?", "Bob"), QAItem("Where?", "Paris")]
    assert load_knowmem(str(muse_dir), "forget_qa_icl") == [QAItem("Q0", "A0")]
    assert load_texts(muse_dir, "privleak", "forget") == ["first forget text", "second forget text"]
    assert load_texts(muse_dir, "privleak", "holdout") == ["a holdout text", "another"]
    assert load_muse_split(muse_dir, "verbmem", "forget") == [{"prompt": "Once upon", "gt": " a time"}]


def test_errors_name_file_row_field(muse_dir):
    (muse_dir / "knowmem" / "retain_qa.json").write_text(json.dumps([{"question": "q", "answer": "a"}, {"question": "q"}]))
    with pytest.raises(MuseDataError) as e:
        load_knowmem(muse_dir, "retain_qa")
    assert "retain_qa.json" in str(e.value) and "row 1" in str(e.value) and "'answer'" in str(e.value)
    (muse_dir / "verbmem" / "bad.json").write_text(json.dumps([{"prompt": 3, "gt": "x"}]))
    with pytest.raises(MuseDataError, match="field 'prompt' must be a string"):
        load_verbmem(muse_dir, "bad")
    with pytest.raises(MuseDataError, match="no file for config 'verbmem' split 'nope'"):
        load_verbmem(muse_dir, "nope")
    with pytest.raises(MuseDataError, match="unknown MUSE config"):
        load_muse_split(muse_dir, "verbatim", "forget")
    with pytest.raises(MuseDataError, match="not plain text"):
        load_texts(muse_dir, "knowmem", "forget_qa")
    with pytest.raises(MuseDataError, match="neither a folder"):
        load_verbmem("no-such-folder")


def test_make_verbmem_items():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "a", "b", "c", "d", "e"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    items = make_verbmem_items(["a b c d e", "a b"], tok, prefix_tokens=2, continuation_tokens=2)
    assert items == [VerbMemItem("a b", "c d")]  # the 2-token text is skipped
    with pytest.raises(MuseDataError, match="prefix_tokens=9"):
        make_verbmem_items(["a b"], tok, prefix_tokens=9)
