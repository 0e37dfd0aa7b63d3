"""Building a provider by name."""

from __future__ import annotations

import pytest

from agrifm_pipeline.providers import make_provider


def test_make_provider() -> None:
    assert make_provider("synthetic", seed=3).name == "synthetic"
    with pytest.raises(Exception, match="root"):
        make_provider("local")
    with pytest.raises(Exception, match="not known"):
        make_provider("sentinelhub")
