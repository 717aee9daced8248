"""The server's answer tracking (vlm/batching.py): what is streamed is never taken back, and adds up to the answer.

Tokens here are the bytes of UTF-8 text (a byte-level decode), so each case reads as text; the server's own runs are in
test_server.py.
"""

from __future__ import annotations

import pytest

from vlm.batching import TextTracker

END = 0  # the end-of-turn token


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")  # U+FFFD for a character whose bytes are not all there


def track(text: str, stops: list[str] = (), max_tokens: int = 100, end: bool = True) -> tuple[list[str], TextTracker]:
    """Feeds `text` one character per token (then the end token): the pieces sent, and the tracker."""
    tracker = TextTracker(decode, {END}, list(stops), max_tokens)
    pieces = []
    for token in [*text.encode(), *([END] if end else [])]:
        pieces.append(tracker.add(token))
        if tracker.finish_reason:
            break
    return pieces, tracker


@pytest.mark.parametrize(
    "text, stops, answer",
    [
        ("  a red circle  \n", [], "a red circle"),  # stripped, as generate_texts answers
        ("red. STOP and more", ["STOP"], "red."),  # cut before the stop string
        ("a ST then STOP", ["STOP"], "a ST then"),  # a stop string's start that was not one is sent in the end
        ("one\n\ntwo", ["\n\n", "xyz"], "one"),
        ("no stop here", ["zz"], "no stop here"),
    ],
)
def test_pieces_add_up_to_the_answer(text, stops, answer):
    pieces, tracker = track(text, stops)
    assert "".join(pieces) == answer
    assert tracker.finish_reason == "stop"


def test_what_is_sent_waits_for_what_could_change():
    tracker = TextTracker(decode, {END}, ["STOP"], 100)
    assert [tracker.add(b) for b in b" ab ST"] == ["", "a", "b", "", "", ""]  # a space; "ST" may start STOP
    assert tracker.add(ord("x")) == " STx"
    assert [tracker.add(b) for b in "é!".encode()] == ["", "é", "!"]  # half a character waits for its other half
    assert tracker.finish_reason is None


def test_length_counts_tokens_and_ends_the_answer():
    pieces, tracker = track("abcdef", max_tokens=3, end=False)
    assert "".join(pieces) == "abc" and tracker.finish_reason == "length" and len(tracker.tokens) == 3
