"""Ray's notice that it turned token authentication on (Ray 2.60, every local start) stays off the console."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("ray")
from ray._private.authentication import authentication_token_setup  # noqa: E402

from posttrain.rl.controller import quiet_ray_token_auth_notice  # noqa: E402


def test_the_token_auth_notice_is_dropped_and_other_ray_warnings_are_not(caplog) -> None:
    logger = logging.getLogger(authentication_token_setup.__name__)
    logger.addHandler(caplog.handler)  # Ray's loggers do not propagate to the root logger
    try:
        authentication_token_setup._warn_token_auth_enabled()  # what ray.init logs for a new local cluster
        assert "Token authentication is enabled" in caplog.text  # without the filter it reaches the console
        caplog.clear()
        quiet_ray_token_auth_notice()
        authentication_token_setup._warn_token_auth_enabled()
        authentication_token_setup._warn_token_auth_disabled()
        assert "Token authentication is enabled" not in caplog.text
        assert "Token authentication is disabled" in caplog.text  # a real security warning still shows
    finally:
        logger.removeHandler(caplog.handler)
