"""Stop strings found across streamed pieces, and text held back only while it may still start one."""

from porter.runtime.chat_session import _StopStrings, end_ids


def stream(pieces, stops):
    """(the text, the pieces shown, stopped) as the chat loop shows them."""
    s, shown = _StopStrings(stops), []
    for piece in pieces:
        shown.append(s.feed(piece))
        if s.stopped:
            break
    shown.append(s.flush())
    return s.text, shown, s.stopped


def test_a_stop_string_split_across_pieces():
    text, shown, stopped = stream(["Hello wor", "ld. ", "<|us", "er|> more"], ["<|user|>"])
    assert (text, stopped) == ("Hello world. ", True) and "".join(shown) == text
    assert shown[2] == ""  # "<|us" was held back: it may start the stop string


def test_held_back_text_is_shown_when_it_is_not_a_stop():
    text, shown, stopped = stream(["a <", "b>", " c"], ["<|user|>", "STOP"])
    assert (text, stopped) == ("a <b> c", False) and "".join(shown) == text
    assert stream(["xS", "TO", "P y"], ["STOP"])[0] == "x"
    assert stream(["aSTOPbSTOP"], ["STOP", "bS"])[0] == "a"
    assert stream(["abc"], [])[:1] == ("abc",)


def test_end_ids_from_the_porter_key_or_llama_cpps():
    assert end_ids({"eog_token_ids": [0, 2], "eos_token_id": 0}) == [0, 2]
    assert end_ids({"eos_token_id": 0, "eot_token_id": 2, "eom_token_id": None}) == [0, 2]
    assert end_ids({}) == []
