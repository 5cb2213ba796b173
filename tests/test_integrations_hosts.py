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
