"""Host-side helpers shared by the plugins (das_sd/integrations/hosts.py)."""

from __future__ import annotations

import pytest

from das_sd.integrations.hosts import parse_prompt_loras, plain_prompt


@pytest.mark.parametrize("prompt, expected", [
    # A1111 / Forge / SD.Next: extra networks, (word:weight), [word], escaped literal brackets
    ("zorblat, a (red:1.3) circle <lora:demo:0.8>, [blue] background", "zorblat, a red circle, blue background"),
    ("((zorblat)), a (circle:0.5)", "zorblat, a circle"),
    (r"a \(literal\) sign", "a (literal) sign"),
    # compel (InvokeAI): (words)1.2, word++, word-
    ("(zorblat)1.2 a red++ circle, blue- background", "zorblat a red circle, blue background"),
    # plain text is left alone, hyphenated words and numbers included
    ("a red-green square, 3 dots", "a red-green square, 3 dots"),
    ("(a cat) 3 dogs", "a cat 3 dogs"),
])
def test_plain_prompt_removes_host_syntax_only(prompt, expected):
    assert plain_prompt(prompt) == expected


def test_prompt_loras_with_weights_and_lycoris_tags():
    text, loras = parse_prompt_loras("a <lora:style_a:0.7> cat <lyco:style_b> <hypernet:h:1>")
    assert text == "a cat" and [(l.name, l.weight) for l in loras] == [("style_a", 0.7), ("style_b", 1.0)]


def test_attributor_cache_keeps_the_most_recently_used_and_clears(monkeypatch, tmp_path):
    """Each Attributor holds a whole pipeline: at most max_entries stay loaded, least recently used
    dropped first; the same store folder (however spelled) and device gives the same one."""
    from das_sd.integrations import hosts

    loaded = []

    class FakeAttributor:
        def __init__(self, store, device=None):
            loaded.append((store, device))

    monkeypatch.setattr(hosts, "Attributor", FakeAttributor)
    cache = hosts.AttributorCache(max_entries=2)
    a = cache.get(tmp_path / "a")
    assert cache.get(str(tmp_path / "x" / ".." / "a")) is a and loaded == [(str(tmp_path / "a"), None)]
    b = cache.get(tmp_path / "b")
    assert cache.get(tmp_path / "a") is a  # b is now the least recently used
    c = cache.get(tmp_path / "a", "cpu")  # another device: another entry, b dropped
    assert len(cache) == 2 and cache.get(tmp_path / "a") is a and cache.get(tmp_path / "a", "cpu") is c
    assert cache.get(tmp_path / "b") is not b and len(loaded) == 4 and len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and cache.get(tmp_path / "a") is not a
    assert hosts.CACHE.max_entries == 2
    with pytest.raises(ValueError, match="max_entries"):
        hosts.AttributorCache(max_entries=0)
