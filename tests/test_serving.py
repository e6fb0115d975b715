"""The engines' pieces that need no server: stop-string cuts, option matching, retries."""
import socket

import pytest

from selftrain import UserError
from selftrain.engines.base import cut_at_stop
from selftrain.engines.openai import OpenAISampler, _option_match


def test_cut_at_the_first_stop_string():
    assert cut_at_stop("one two. three", (".", "two")) == "one "
    assert cut_at_stop("no stop here", ("###",)) == "no stop here"
    assert cut_at_stop("keep", ()) == "keep"


def test_option_match_takes_the_longest_prefix_token_and_floors_the_rest():
    top = [{"token": "Yes", "logprob": -0.2}, {"token": " No", "logprob": -1.9}, {"token": "(", "logprob": -3.0},
           {"token": "(A", "logprob": -2.5}]
    assert _option_match(["Yes", "No", "(A)", "Maybe"], top, floor=-3.0) == [-0.2, -1.9, -2.5, -3.0]


def test_unreachable_server_after_retries_is_one_line():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError) as e:
        OpenAISampler(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff_s=0.2)
    msg = str(e.value)
    assert "\n" not in msg and f"sampler.base_url=http://127.0.0.1:{port}/v1" in msg and "3 attempt(s)" in msg
