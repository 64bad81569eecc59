"""Prompt formatting and batching."""

import json

import pytest
import torch

from cna_lens.datasets import DATASETS, load_dataset, load_prompts, read_prompt_file
from cna_lens.prompts import check_prompts, encode, format_prompt, left_pad, length_batches

from ..conftest import byte_tokenizer


def test_chat_format_has_single_template_and_no_added_bos():
    tok = byte_tokenizer(chat=True)
    ids = format_prompt(tok, "Hi")
    text = tok.decode(ids)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.bos_token_id not in ids
    sys_ids = format_prompt(tok, "Hi", system="Be brief.")
    assert tok.decode(sys_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_base_model_uses_raw_prompt():
    tok = byte_tokenizer(chat=False)
    ids = format_prompt(tok, "Hi")
    assert tok.decode(ids, skip_special_tokens=True) == "Hi"
    with pytest.raises(ValueError, match="chat template"):
        format_prompt(tok, "Hi", chat=True)
    assert format_prompt(byte_tokenizer(chat=True), "Hi", chat=False) == ids


def test_left_pad_puts_final_token_last():
    ids, mask = left_pad([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_length_batches_cover_every_index_once():
    lengths = [5, 1, 9, 3, 9, 2, 7]
    for overhead in (0, 4, 64, 10**6):
        batches = length_batches(lengths, 3, overhead)
        assert sorted(i for b in batches for i in b) == list(range(7))
        assert all(0 < len(b) <= 3 for b in batches)
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(flat, reverse=True)  # longest first, contiguous in length
    # a per-pass cost that dwarfs padding: as few passes as possible, full ones
    assert len(length_batches(lengths, 3, 10**6)) == 3
    assert len(length_batches(lengths, 3, 0)) == 6  # no pass cost: cut wherever the length drops
    with pytest.raises(ValueError):
        length_batches(lengths, 0)


def test_length_batches_cut_where_padding_costs_more_than_a_pass():
    lengths = [100] + [10] * 9
    # one batch computes 10 × 100 = 1000 positions; apart: 100 + 9 × 10 = 190, for one more pass
    assert [len(b) for b in length_batches(lengths, 10, overhead=500)] == [1, 9]
    assert [len(b) for b in length_batches(lengths, 10, overhead=900)] == [10]
    # minimal cost, checked against every way of cutting 6 sorted lengths
    import itertools

    lens = [7, 7, 5, 4, 2, 1]
    best = min(
        sum(len(c) * c[0] + 3 for c in chunks)
        for cuts in itertools.product([0, 1], repeat=5)
        for chunks in [_chunks(lens, cuts)]
        if all(len(c) <= 4 for c in chunks)
    )
    got = length_batches(lens, 4, overhead=3)
    assert sum(len(b) * lens[b[0]] + 3 for b in got) == best


def _chunks(lens, cuts):
    out, cur = [], [lens[0]]
    for x, c in zip(lens[1:], cuts):
        if c:
            out.append(cur)
            cur = []
        cur.append(x)
    return out + [cur]


def test_check_prompts_names_the_argument():
    with pytest.raises(ValueError, match="`positive` is empty"):
        check_prompts([], "positive")
    with pytest.raises(ValueError, match=r"`prompts\[1\]` is an empty prompt"):
        check_prompts(["a", "  "])
    with pytest.raises(TypeError, match="single string"):
        encode(byte_tokenizer(), "abc")


def test_bundled_datasets_load():
    for name in DATASETS:
        rows = load_dataset(name)
        assert rows and all(isinstance(r["prompt"], str) and r["prompt"] for r in rows), name
    assert len(load_prompts("jbb_harmful")) == 100
    assert len(load_prompts("discovery_harmful")) == 99
    assert len(set(load_prompts("discovery_harmless"))) == len(load_prompts("discovery_harmless")) == 103
    assert len(load_prompts("xstest_safe")) == 250
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="limit"):
        load_dataset("jbb_harmful", limit=101)


def test_discovery_and_jbb_do_not_overlap():
    norm = lambda s: " ".join("".join(c for c in s.lower() if c.isalnum() or c.isspace()).split())  # noqa: E731
    disc = {norm(p) for p in load_prompts("discovery_harmful") + load_prompts("discovery_harmless")}
    jbb = {norm(p) for p in load_prompts("jbb_harmful") + load_prompts("jbb_benign")}
    assert not disc & jbb


def test_read_prompt_file(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\nfirst\n\nsecond\n")
    assert read_prompt_file(tmp_path / "p.txt") == ["first", "second"]
    (tmp_path / "p.json").write_text(json.dumps(["a", {"prompt": "b"}]))
    assert read_prompt_file(tmp_path / "p.json") == ["a", "b"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        read_prompt_file(tmp_path / "p.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        read_prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        read_prompt_file(tmp_path / "missing.txt")


def test_response_prefix_follows_the_assistant_turn():
    tok = byte_tokenizer(chat=True)
    ids = format_prompt(tok, "Hi", response_prefix="The answer is")
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nThe answer is"
    base = byte_tokenizer(chat=False)
    assert base.decode(format_prompt(base, "Q:", response_prefix=" A"), skip_special_tokens=True) == "Q: A"
