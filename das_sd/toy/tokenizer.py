"""A small CLIP-style BPE tokenizer for the embedded model.

The real CLIP vocabulary (49,408 tokens) would make the text encoder's embedding table alone larger
than the rest of the tiny model. Instead we learn a few hundred BPE merges on the base model's
caption vocabulary, keep CLIP's byte-level alphabet (every byte and every byte + "</w>"), and wrap
the result in transformers' own ``CLIPTokenizer``. Unknown words therefore split into byte pieces,
exactly as rare words do in real CLIP, and nothing ever maps to an unknown token.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation pattern (OpenAI simple_tokenizer), so words split the way CLIP splits them.
CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character table.

    Returns:
        256 characters: entry b is the printable character byte b maps to.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    order = sorted(range(256), key=lambda i: bs[i])
    return [chr(cs[i]) for i in order]


def train_clip_bpe(corpus: list[str], num_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn BPE merges on ``corpus`` with CLIP's normalisation and pre-tokenisation.

    Args:
        corpus: The training captions.
        num_merges: Merges to learn at most (the vocabulary grows by at most as many tokens).

    Returns:
        The vocabulary (every byte character, each also with "</w>", the merged tokens, then BOS and
        EOS) as token -> id, and the merges in order.
    """
    alphabet = bytes_to_unicode()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=_regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    base_size = 2 * len(alphabet) + 2
    trainer = trainers.BpeTrainer(
        vocab_size=base_size + num_merges,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
        special_tokens=[],
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges_of(bpe)]

    vocab_list = alphabet + [a + "</w>" for a in alphabet]
    seen = set(vocab_list)
    for left, right in merges:
        token = left + right
        if token not in seen:
            vocab_list.append(token)
            seen.add(token)
    vocab_list += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def _regex(pattern: str):
    from tokenizers import Regex

    return Regex(pattern)


def _merges_of(bpe: Tokenizer) -> list:
    import json

    return json.loads(bpe.to_str())["model"]["merges"]


def build_clip_tokenizer(corpus: list[str], max_length: int, num_merges: int = 400) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` with BPE merges learned on ``corpus`` (``train_clip_bpe``).

    Args:
        corpus: The training captions.
        max_length: Tokens per prompt, BOS and EOS included (the text encoder's maximum).
        num_merges: BPE merges to learn.

    Returns:
        The tokenizer; EOS also serves as padding and unknown token.
    """
    vocab, merges = train_clip_bpe(corpus, num_merges=num_merges)
    # transformers 5: vocab=/merges= (dict / list of tuples). The old vocab_file= keyword is
    # silently ignored there and yields a 3-token tokenizer.
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length,
                        bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    return tok


def save_tokenizer(tok: CLIPTokenizer, directory: Path) -> None:
    """Save a tokenizer in the diffusers layout (``save_pretrained``).

    Args:
        tok: The tokenizer.
        directory: The folder to write (``tokenizer`` of a pipeline folder).
    """
    tok.save_pretrained(str(directory))
