from transformers import CLIPTokenizer

from das_sd.toy.tokenizer import build_clip_tokenizer


def test_small_clip_bpe_round_trips_and_never_maps_to_unknown(tmp_path):
    corpus = ["a red circle on a blue background", "a green square on a black background"] * 20
    tok = build_clip_tokenizer(corpus, max_length=32, num_merges=100)
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded.model_max_length == 32
    ids = loaded("a red circle on a blue background").input_ids
    tokens = loaded.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert "circle</w>" in tokens and "background</w>" in tokens  # learned words are single tokens
    # unseen words and symbols split into byte pieces; none becomes the unknown / pad token
    rare = loaded("zorblat ü 😀 !?").input_ids
    assert loaded.eos_token_id not in rare[1:-1] and len(rare) > 6
    assert loaded.decode(rare, skip_special_tokens=True).replace(" ", "") == "zorblatü😀!?"
    padded = loaded(["a red circle"], padding="max_length", max_length=32).input_ids[0]
    assert len(padded) == 32
