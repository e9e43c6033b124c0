import pytest
import torch

from modules.tokenization_clip import get_tokenizer, tokenize, tokenize_captions


def test_bpe_ids_match_reference(reference):
    tok = get_tokenizer()
    t = reference["tokenizer"]
    for text, ids in zip(t["texts"], t["bpe_ids"]):
        assert tok.encode(text) == list(ids), text


def test_eval_tokens_match_reference(reference):
    t = reference["tokenizer"]
    assert torch.equal(tokenize(t["texts"]), t["eval_tokens"])


def test_train_tokens_match_reference(reference):
    tt = reference["train_text"]
    ids, mask = tokenize_captions(tt["captions"], max_words=tt["input_ids"].shape[1])
    assert torch.equal(ids, tt["input_ids"]) and torch.equal(mask, tt["attention_mask"])


def test_truncation_and_layout():
    tok = get_tokenizer()
    long = "word " * 100
    ids = tokenize([long, ""])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == tok.sot_id and ids[0, -1] == tok.eot_id and (ids[0] > 0).all()
    assert ids[1, :2].tolist() == [tok.sot_id, tok.eot_id] and ids[1, 2:].eq(0).all()
    with pytest.raises(ValueError):
        tokenize([long], truncate=False)
    cap, mask = tokenize_captions([long], max_words=32)
    assert cap[0, -1] == tok.eot_id and mask.sum() == 32


def test_matches_openai_clip_package():
    """The genuine OpenAI tokenizer (clip-anytorch from PyPI) as an oracle."""
    clip = pytest.importorskip("clip")
    texts = ["a photo of a dog.", "Thé QUICK brown fox jumps over 13 lazy dogs!!", "&lt;b&gt; tags &amp; more"]
    assert torch.equal(tokenize(texts), clip.tokenize(texts).long())


def test_decode_roundtrip():
    tok = get_tokenizer()
    assert tok.decode(tok.encode("a photo of a cat.")).strip() == "a photo of a cat ."
