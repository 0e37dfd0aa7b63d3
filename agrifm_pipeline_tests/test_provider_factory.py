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


def test_one_registry_names_every_provider_and_its_identity(tmp_path) -> None:
    """The registry is the one list: the resource, the factory, the API and the environment
    all read it, and each provider says how it is identified."""
    import pytest as _pytest

    from agrifm_pipeline.defs.resources import S2Source
    from agrifm_pipeline.errors import BackendError
    from agrifm_pipeline.providers import PROVIDER_NAMES, provider_class, real_data_providers

    assert set(PROVIDER_NAMES) == {"gee", "local", "stac", "synthetic"}
    assert real_data_providers() == ("gee", "local", "stac")
    assert S2Source(backend="local", local_root="x").identity() == {"name": "local", "root": "x"}
    assert S2Source(backend="synthetic", synthetic_seed=3).identity() == {
        "name": "synthetic", "seed": 3, "field_m": 400.0, "generator": 2,
    }  # fmt: skip
    assert S2Source(backend="gee", gee_endpoint="highvolume").identity() == {
        "name": "gee", "endpoint": "highvolume",
    }  # fmt: skip
    for name in PROVIDER_NAMES:
        assert provider_class(name).identity.__doc__
    with _pytest.raises(BackendError, match="gee, local, stac, synthetic"):
        provider_class("sentinelhub")
